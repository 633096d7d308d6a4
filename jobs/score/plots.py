"""PNG charts of a COCO evaluation: precision-recall curves and per-category AP.

Rendered with matplotlib's Agg canvas on ``Figure`` objects (no pyplot global state, no
display needed), returned as PNG bytes so the caller decides where they are written.
All curves are for area ``all`` at 100 detections per image, sampled at COCO's 101 recall
thresholds (the interpolated precision that AP averages).
"""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.figure import Figure

from coco.evaluation import IOU_THRESHOLDS, RECALL_THRESHOLDS, CocoEvaluation

PR_OVERALL = "pr_overall.png"
PR_PER_CATEGORY = "pr_per_category.png"
AP_PER_CATEGORY = "ap_per_category.png"

# (label, IoU threshold index or None for the mean over 0.50:0.95)
CURVES: tuple[tuple[str, int | None], ...] = (("IoU=0.50", 0), ("IoU=0.75", 5), ("IoU=0.50:0.95", None))


def _curve(precision: np.ndarray, iou_index: int | None) -> np.ndarray:
    """Mean over IoU thresholds (all or one) and over the given categories of valid entries.

    Args:
        precision: ``float64[T, R, K]`` with -1 marking categories without ground truth.

    Returns:
        ``float64[R]``, NaN where no category is valid.
    """
    if iou_index is not None:
        precision = precision[iou_index : iou_index + 1]
    valid = precision > -1
    with np.errstate(invalid="ignore"):
        return np.where(valid, precision, 0.0).sum(axis=(0, 2)) / valid.sum(axis=(0, 2))


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()


def render_plots(evaluation: CocoEvaluation, category_names: list[str]) -> dict[str, bytes]:
    """Render the three charts.

    Args:
        evaluation: the accumulated evaluation.
        category_names: names aligned with ``evaluation.category_ids``.

    Returns:
        File name -> PNG bytes for ``PR_OVERALL``, ``PR_PER_CATEGORY`` and ``AP_PER_CATEGORY``.
    """
    if len(category_names) != len(evaluation.category_ids):
        raise ValueError(
            f"category_names has {len(category_names)} names for {len(evaluation.category_ids)} categories"
        )
    precision = evaluation.precision[:, :, :, 0, -1]  # (T, R, K)
    scored = np.flatnonzero((precision > -1).any(axis=(0, 1)))
    return {
        PR_OVERALL: _render_overall(precision),
        PR_PER_CATEGORY: _render_per_category(precision, category_names, scored),
        AP_PER_CATEGORY: _render_ap_bars(evaluation, category_names, scored),
    }


def _render_overall(precision: np.ndarray) -> bytes:
    figure = Figure(figsize=(6, 5))
    axes = figure.add_subplot()
    for label, iou_index in CURVES:
        axes.plot(RECALL_THRESHOLDS, _curve(precision, iou_index), label=label)
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    axes.set_title("Precision-recall, mean over categories (area all, 100 dets)")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left")
    return _png(figure)


def _render_per_category(precision: np.ndarray, category_names: list[str], scored: np.ndarray) -> bytes:
    columns = max(1, math.ceil(math.sqrt(len(scored))))
    rows = max(1, math.ceil(len(scored) / columns))
    width, height = max(6.0, 2.2 * columns), max(4.0, 2.0 * rows) + 0.6
    figure = Figure(figsize=(width, height))
    # Fixed margins in inches: constrained layout costs seconds with 80 panels.
    figure.subplots_adjust(
        left=0.4 / width, right=1 - 0.1 / width, bottom=0.3 / height, top=1 - 0.8 / height, wspace=0.3, hspace=0.5
    )
    for panel, k in enumerate(scored):
        axes = figure.add_subplot(rows, columns, panel + 1)
        for label, iou_index in CURVES[:2]:
            axes.plot(RECALL_THRESHOLDS, precision[iou_index, :, k], label=label, linewidth=1)
        axes.set_title(category_names[k], fontsize=8)
        axes.set(xlim=(0, 1), ylim=(0, 1.02))
        axes.tick_params(labelsize=6)
        if panel == 0:
            axes.legend(fontsize=6, loc="lower left")
    if len(scored) == 0:
        figure.text(0.5, 0.5, "no category has ground truth", ha="center")
    figure.suptitle(f"Precision-recall per category (IoU {IOU_THRESHOLDS[0]:.2f} and 0.75)")
    return _png(figure)


def _render_ap_bars(evaluation: CocoEvaluation, category_names: list[str], scored: np.ndarray) -> bytes:
    ap = evaluation.category_ap()[scored]
    ap50 = evaluation.category_ap(iou_index=0)[scored]
    order = np.argsort(ap, kind="stable")
    names = [category_names[k] for k in scored[order]]
    figure = Figure(figsize=(7, max(2.5, 0.22 * len(scored) + 1.0)), layout="constrained")
    axes = figure.add_subplot()
    positions = np.arange(len(scored))
    axes.barh(positions, ap50[order], color="#9ecae1", label="AP50")
    axes.barh(positions, ap[order], color="#08519c", label="AP@[.50:.95]")
    axes.set_yticks(positions, names, fontsize=7)
    axes.set(xlim=(0, 1), xlabel="average precision")
    axes.set_title("AP per category")
    axes.legend(loc="lower right")
    return _png(figure)
