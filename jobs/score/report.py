"""Score predictions against COCO ground truth: the 12 COCO bbox stats, per-category AP, PR curves.

Runs the same locally and under ``ray job submit -- python -m jobs.score ...``; it needs no
Ray cluster (the vectorized evaluator scores COCO-val-sized input in a few seconds on one core)
and never imports torch.

PREDICTIONS is the Parquet folder written by ``jobs.annotate`` or a COCO results JSON, and
ANNOTATIONS a COCO instances JSON, each at any fsspec URI. See :mod:`coco.join` for how Parquet
rows are joined to ground-truth images by file name, and :mod:`coco.evaluation` for the evaluator
(equal to pycocotools' ``COCOeval``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import numpy as np

from coco import (
    CocoEvaluation,
    CocoInstances,
    Predictions,
    evaluate_boxes,
    format_stats,
    load_predictions,
    read_instances,
)
from coco.detection_table import incomplete_warning
from coco.evaluation import STAT_NAMES
from jobs.score.settings import ScoreConfig
from storage import write_bytes


@dataclass(frozen=True)
class ScoreResult:
    """The JSON-ready report; its summary is the stats and counts as printed."""

    report: dict

    def summary(self) -> str:
        return format_stats(self.report["stats"]) + "\n" + format_counts(self.report)


def build_report(
    ground_truth: CocoInstances, predictions: Predictions, evaluation: CocoEvaluation, image_ids: np.ndarray
) -> dict:
    """The JSON-ready result: stats under ``STAT_NAMES``, per-category AP/AP50 (null without ground truth), counts."""
    ap, ap50 = evaluation.category_ap(), evaluation.category_ap(iou_index=0)
    counts = predictions.counts
    return {
        "predictions": predictions.uri,
        "annotations": ground_truth.uri,
        "stats": {name: evaluation.stats[name] for name in STAT_NAMES},
        "per_category": [
            {
                "category_id": int(category_id),
                "name": name,
                "ap": None if np.isnan(ap[k]) else float(ap[k]),
                "ap50": None if np.isnan(ap50[k]) else float(ap50[k]),
                "ground_truth_boxes": int(evaluation.ground_truth_counts[k]),
            }
            for k, (category_id, name) in enumerate(
                zip(evaluation.category_ids, ground_truth.category_names, strict=True)
            )
        ],
        "counts": {
            "images_scored": len(image_ids),
            "images_with_predictions_without_ground_truth": counts.images_without_ground_truth,
            "ground_truth_images_without_predictions": len(ground_truth.image_ids) - counts.images_predicted,
            "failed_inputs": counts.failed_inputs,
            "detections_scored": counts.detections_kept,
            "detections_skipped": {
                "malformed": counts.skipped_malformed,
                "not_finite": counts.skipped_not_finite,
                "negative_size": counts.skipped_negative_size,
                "unknown_category": counts.skipped_unknown_category,
            },
        },
    }


def format_counts(report: dict) -> str:
    """The counts as aligned ``name: value`` lines."""
    counts = dict(report["counts"])
    skipped = counts.pop("detections_skipped")
    lines = [f" {name.replace('_', ' ')}: {value}" for name, value in counts.items()]
    lines += [
        f" detections skipped ({reason.replace('_', ' ')}): {value}" for reason, value in skipped.items() if value
    ]
    return "\n".join(lines)


def main(config: ScoreConfig) -> ScoreResult:
    """Load, evaluate, and write the optional JSON and plots.

    Raises:
        CocoFormatError: an input is unusable; StorageError: an output cannot be written.
    """
    warning = None if config.allow_incomplete else incomplete_warning(config.predictions)
    if warning:
        print(f"score: warning: {warning}", file=sys.stderr)
    ground_truth = read_instances(config.annotations)
    predictions = load_predictions(config.predictions, ground_truth)
    image_ids = ground_truth.image_ids if config.all_images else predictions.image_ids
    evaluation = evaluate_boxes(ground_truth.boxes, predictions.detections, image_ids, ground_truth.category_ids)
    report = build_report(ground_truth, predictions, evaluation, image_ids)
    if config.output:
        write_bytes(config.output, (json.dumps(report, indent=2) + "\n").encode())
    if config.plot:
        from jobs.score.plots import render_plots  # matplotlib costs ~0.5 s to import; only when asked

        for name, png in render_plots(evaluation, ground_truth.category_names).items():
            write_bytes(f"{config.plot.rstrip('/')}/{name}", png)
    return ScoreResult(report)
