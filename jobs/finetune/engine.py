"""One epoch of training and one evaluation, the way DETR's ``engine.py`` splits them; no Ray here.

:func:`train_one_epoch` runs a worker's shard through the model, the set criterion and the
optimizer; :func:`evaluate` predicts the validation slice, gathers every worker's detections
and scores them with :func:`coco.evaluate_boxes` (pycocotools' bbox evaluation) against the
instances file as :func:`coco.read_instances` parsed it, crowd regions included, so they are
ignored exactly as the score job ignores them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from coco import CocoInstances, DetectionBoxes, evaluate_boxes, xyxy_to_xywh
from detr import DETR, SetCriterion, collate, postprocess
from detr.checkpoint import unwrap
from detr.criterion import weighted_total
from jobs.finetune.settings import FinetuneConfig


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the epoch and step."""


def collate_detection_batch(samples: Sequence[tuple[Tensor, dict]]) -> tuple[Tensor, Tensor, list[dict]]:
    """uint8 images of any sizes -> normalized, padded ``pixel_values`` [B, 3, H, W], ``pixel_mask`` [B, H, W]."""
    images, targets = zip(*samples)
    batch = collate(list(images), [t["orig_size"] for t in targets])
    return batch.pixel_values, batch.pixel_mask, list(targets)


def parameter_groups(model: nn.Module, config: FinetuneConfig) -> list[dict]:
    """AdamW groups: backbone parameters at ``lr_backbone``, the rest at ``lr`` (frozen ones left out)."""
    backbone = [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]
    groups = [{"params": rest, "lr": config.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": config.lr_backbone})
    return groups


def build_optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups`, fused: one pass over the trained parameters per step
    instead of a dozen (same update; benchmarks/RESULTS.md)."""
    return torch.optim.AdamW(parameter_groups(model, config), weight_decay=config.weight_decay, fused=True)


def _all_reduce_sum(values: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    return values


def train_one_epoch(
    model: nn.Module,
    criterion: SetCriterion,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    config: FinetuneConfig,
    device: torch.device,
    epoch: int,
    step: int,
    autocast: ContextManager | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[dict[str, float], int]:
    """One pass over this worker's shard.

    Returns:
        The epoch's metrics averaged over all workers' steps (``loss`` - the weighted total -
        ``loss_ce``, ``loss_bbox``, ``loss_giou`` of the last decoder layer, ``images_per_second``
        summed over workers) and the global step count after the epoch.
    Raises:
        NonFiniteLossError: on every worker as soon as any worker's loss is NaN or infinite.
    """
    model.train()
    criterion.train()
    names = ("loss", "loss_ce", "loss_bbox", "loss_giou")
    sums = torch.zeros(len(names) + 2, dtype=torch.float64)  # + steps, images
    start = time.perf_counter()
    for pixel_values, pixel_mask, targets in loader:
        pixel_values = pixel_values.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        pixel_mask = pixel_mask.to(device, non_blocking=True)
        targets = [{"labels": t["labels"].to(device), "boxes": t["boxes"].to(device)} for t in targets]
        with autocast or nullcontext():
            outputs = model(pixel_values, pixel_mask)
        losses = criterion(_to_float32(outputs), targets)
        loss = weighted_total(losses, config.loss.loss_weights)
        # Every worker must stop at the same step, or the healthy ones would wait forever in all-reduce.
        bad = _all_reduce_sum(torch.tensor([0.0 if math.isfinite(loss.item()) else 1.0], device=device))
        if bad.item() > 0:
            terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items() if not k[-1].isdigit())
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch}, step {step} (loss={loss.item():.4g}; {terms}); "
                f"lower --lr or use --precision fp32"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if config.clip_max_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.clip_max_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        step += 1
        values = [loss.item(), *(losses[n].item() for n in names[1:]), 1.0, float(len(targets))]
        sums += torch.tensor(values, dtype=torch.float64)
    elapsed = time.perf_counter() - start
    totals = _all_reduce_sum(sums.to(device)).cpu()
    steps = max(totals[-2].item(), 1.0)
    metrics = {n: totals[i].item() / steps for i, n in enumerate(names)}
    metrics["images_per_second"] = totals[-1].item() / max(elapsed, 1e-9)
    return metrics, step


def _to_float32(outputs: dict) -> dict:
    """The loss in float32 whatever the autocast dtype (softmax and GIoU are unstable in half precision)."""
    cast = {k: v.float() for k, v in outputs.items() if isinstance(v, Tensor)}
    if "aux_outputs" in outputs:
        cast["aux_outputs"] = [{k: v.float() for k, v in a.items()} for a in outputs["aux_outputs"]]
    return cast


def evaluate(
    model: nn.Module,
    loader: Iterable,
    instances: CocoInstances,
    device: torch.device,
    autocast: ContextManager | None = None,
) -> dict[str, float]:
    """COCO stats of the model on the whole validation set (each worker predicts its slice), keyed ``val_AP`` etc."""
    rows = gather_rows(predict_detections(unwrap(model), loader, device, autocast))
    return {f"val_{k}": v for k, v in coco_box_ap(instances, rows).items()}


@torch.no_grad()
def predict_detections(
    model: DETR,
    batches: Iterable[tuple[Tensor, Tensor, list[dict]]],
    device: torch.device,
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
            xywh = torch.from_numpy(xyxy_to_xywh(result["boxes"].double().cpu().numpy()))
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


def coco_box_ap(instances: CocoInstances, rows: np.ndarray) -> dict[str, float]:
    """The 12 COCO stats (``AP``, ``AP50``, ...) of detection rows from :func:`predict_detections`."""
    detections = DetectionBoxes(
        image_ids=rows[:, 0].astype(np.int64),
        category_ids=rows[:, 1].astype(np.int64),
        boxes_xywh=rows[:, 2:6].astype(np.float64),
        scores=rows[:, 6].astype(np.float64),
    )
    evaluation = evaluate_boxes(instances.boxes, detections, instances.image_ids, instances.category_ids)
    return dict(evaluation.stats)
