"""From model outputs to detections in the original image's pixels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_convert

from .categories import Category


def postprocess(outputs: dict, original_sizes: Tensor, threshold: float = 0.7) -> list[dict[str, Tensor]]:
    """Best class per query, thresholded, with boxes in absolute pixels.

    Args:
        outputs: the model's dict with ``pred_logits`` Tensor[B, Q, K + 1] and ``pred_boxes``
            Tensor[B, Q, 4] (normalized cxcywh).
        original_sizes: int Tensor[B, 2], (height, width) of each image before resizing.
        threshold: keep queries whose best (non "no object") probability is above this.
    Returns:
        Per image a dict with ``scores`` Tensor[N], ``labels`` int64 Tensor[N] (class indices) and
        ``boxes`` Tensor[N, 4] as absolute xyxy in the original image's pixels.
    """
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    if original_sizes.shape != (logits.shape[0], 2):
        raise ValueError(
            f"original_sizes must be [{logits.shape[0]}, 2] (height, width), got {tuple(original_sizes.shape)}"
        )
    probabilities = logits.float().softmax(-1)[..., :-1]  # drop "no object"
    scores, labels = probabilities.max(-1)  # (B, Q)
    heights, widths = original_sizes.to(boxes.device, torch.float32).unbind(1)
    scale = torch.stack([widths, heights, widths, heights], dim=1)[:, None, :]  # (B, 1, 4)
    boxes_xyxy = box_convert(boxes.float(), "cxcywh", "xyxy") * scale  # (B, Q, 4)
    keep = scores > threshold
    return [{"scores": s[k], "labels": c[k], "boxes": b[k]} for s, c, b, k in zip(scores, labels, boxes_xyxy, keep)]


def detection_records(result: dict[str, Tensor], categories: Sequence[Category]) -> list[dict]:
    """One image's :func:`postprocess` result as plain rows: ``category_id``, ``label``, ``score``,
    ``box`` ([x_min, y_min, x_max, y_max] pixels), best score first."""
    order = result["scores"].argsort(descending=True)
    return [
        {
            "category_id": categories[int(label)].id,
            "label": categories[int(label)].name,
            "score": float(score),
            "box": [float(v) for v in box],
        }
        for score, label, box in zip(
            result["scores"][order].tolist(), result["labels"][order].tolist(), result["boxes"][order].tolist()
        )
    ]
