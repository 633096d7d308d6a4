"""COCO box AP of a model on a validation set, computed while training.

Every worker predicts its own slice of the validation images; the detections are gathered
on all workers and scored with :func:`jobs.coco_metrics.evaluate_boxes` (pycocotools'
bbox evaluation) against the annotations file as written (crowd regions included, so they
are ignored exactly as the score job ignores them).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from detr.model import DETR
from detr.postprocess import postprocess
from jobs.coco_dataset import CocoAnnotations
from jobs.coco_metrics import DetectionBoxes, GroundTruthBoxes, evaluate_boxes


def ground_truth_boxes(annotations: CocoAnnotations) -> GroundTruthBoxes:
    """The file's annotations as evaluator arrays (absolute xywh pixels, file order)."""
    entries = annotations.document["annotations"]
    boxes = np.asarray([a["bbox"] for a in entries], dtype=np.float64).reshape(-1, 4)
    return GroundTruthBoxes(
        image_ids=np.asarray([a["image_id"] for a in entries], dtype=np.int64),
        category_ids=np.asarray([a["category_id"] for a in entries], dtype=np.int64),
        boxes_xywh=boxes,
        areas=np.asarray([a.get("area", b[2] * b[3]) for a, b in zip(entries, boxes)], dtype=np.float64),
        is_crowd=np.asarray([bool(a.get("iscrowd", 0)) for a in entries], dtype=bool),
        annotation_ids=np.asarray([a.get("id", i + 1) for i, a in enumerate(entries)], dtype=np.int64),
    )


@torch.no_grad()
def predict_detections(
    model: DETR, batches: Iterable[tuple[Tensor, Tensor, list[dict]]], device: torch.device,
    autocast: ContextManager | None = None,
) -> np.ndarray:
    """Every query's best class and box for each image.

    Args:
        model: the (unwrapped) DETR, put in eval mode here.
        batches: ``(pixel_values [B, 3, H, W], pixel_mask [B, H, W], targets)`` with ``image_id`` and
            ``orig_size`` (height, width) in each target.
    Returns:
        float64 ``[D, 7]`` rows ``(image_id, category_id, x, y, width, height, score)``, boxes as absolute
        xywh pixels of the original image.
    """
    model.eval()
    category_ids = torch.tensor([c.id for c in model.categories], dtype=torch.float64)
    rows = []
    for pixel_values, pixel_mask, targets in batches:
        with autocast or nullcontext():
            outputs = model(pixel_values.to(device), pixel_mask.to(device))
        sizes = torch.tensor([t["orig_size"] for t in targets], dtype=torch.int64)
        # threshold 0: keep every query, as COCO evaluation of DETR does (at most Q detections per image).
        for target, result in zip(targets, postprocess(outputs, sizes, threshold=0.0)):
            boxes = result["boxes"].double().cpu()
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
            image_id = torch.full((len(xywh), 1), float(target["image_id"]), dtype=torch.float64)
            labels = category_ids[result["labels"].cpu()][:, None]
            rows.append(torch.cat([image_id, labels, xywh, result["scores"].double().cpu()[:, None]], dim=1))
    return torch.cat(rows).numpy() if rows else np.zeros((0, 7))


def gather_rows(rows: np.ndarray) -> np.ndarray:
    """Concatenate every worker's detection rows (a no-op without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return rows
    gathered: list[np.ndarray | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    return np.concatenate([g for g in gathered if g is not None])


def coco_box_ap(annotations: CocoAnnotations, rows: np.ndarray) -> dict[str, float]:
    """The 12 COCO stats (``AP``, ``AP50``, ...) of detection rows from :func:`predict_detections`."""
    detections = DetectionBoxes(
        image_ids=rows[:, 0].astype(np.int64), category_ids=rows[:, 1].astype(np.int64),
        boxes_xywh=rows[:, 2:6].astype(np.float64), scores=rows[:, 6].astype(np.float64),
    )
    image_ids = np.asarray([r.image_id for r in annotations.images], dtype=np.int64)
    category_ids = np.asarray([c.id for c in annotations.categories], dtype=np.int64)
    evaluation = evaluate_boxes(ground_truth_boxes(annotations), detections, image_ids, category_ids)
    return dict(evaluation.stats)
