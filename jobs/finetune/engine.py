"""One epoch of training and one evaluation, the way DETR's ``engine.py`` splits them; no Ray here.

:func:`train_one_epoch` runs a worker's shard through the model, the set criterion and the
optimizer; :func:`evaluate` predicts the validation slice, gathers every worker's detections
and scores them with :func:`coco.evaluate_boxes` (pycocotools' bbox evaluation) against the
instances file as :func:`coco.read_instances` parsed it, crowd regions included, so they are
ignored exactly as the score job ignores them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

import detr
from coco import CocoInstances, DetectionBoxes, evaluate_boxes, xyxy_to_xywh
from detr import DETR, Category, DetrConfig, SetCriterion, collate, postprocess
from detr.checkpoint import unwrap
from detr.criterion import weighted_total
from jobs.finetune.data import BadImage
from jobs.finetune.settings import FinetuneConfig

logger = logging.getLogger(__name__)


def build_model(
    settings: FinetuneConfig, model: DetrConfig, categories: Sequence[Category], initial_state: dict[str, Tensor]
) -> tuple[DETR, SetCriterion]:
    """The DETR to train and its criterion (:func:`detr.build`): ``initial_state`` loaded, the backbone
    frozen if asked, and the weights in channels-last memory, which oneDNN (CPU) and cuDNN (GPU)
    convolve faster (benchmarks/RESULTS.md). Saved state dicts are the same either way."""
    detector, criterion = detr.build(model, settings.loss, categories)
    detector.load_state_dict(initial_state)
    if settings.freeze_backbone:
        detector.backbone.requires_grad_(False)
    return detector.to(memory_format=torch.channels_last), criterion


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the epoch and step."""


class TooManyBadImagesError(RuntimeError):
    """More training images of one epoch were unusable than ``--max-bad-fraction`` allows."""


class DetectionBatch(NamedTuple):
    """A collated batch.

    Args:
        pixel_values: float32 ``[B, 3, H, W]`` normalized and padded (None when every sample was bad).
        pixel_mask: bool ``[B, H, W]``, True on image pixels.
        targets: one dict per image (``boxes`` normalized cxcywh ``[N, 4]``, ``labels`` ``[N]``, ...).
        skipped: the samples left out because their image could not be used.
        samples: samples drawn, good and bad: what the sampler's position advances by.
    """

    pixel_values: Tensor | None
    pixel_mask: Tensor | None
    targets: list[dict]
    skipped: tuple[BadImage, ...] = ()
    samples: int = 0


def collate_detection_batch(samples: Sequence[tuple[Tensor, dict] | BadImage]) -> DetectionBatch:
    """uint8 images of any sizes -> normalized, padded ``pixel_values`` [B, 3, H, W], ``pixel_mask`` [B, H, W];
    :class:`BadImage` entries are left out and listed in ``skipped``."""
    good = [s for s in samples if not isinstance(s, BadImage)]
    skipped = tuple(s for s in samples if isinstance(s, BadImage))
    if not good:
        return DetectionBatch(None, None, [], skipped, len(samples))
    images, targets = zip(*good)
    batch = collate(list(images), [t["orig_size"] for t in targets])
    return DetectionBatch(batch.pixel_values, batch.pixel_mask, list(targets), skipped, len(samples))


@dataclass(frozen=True)
class EpochProgress:
    """How far an epoch got, summed over all workers: what a mid-epoch checkpoint stores to resume it.

    Args:
        position: samples of the epoch's permutation drawn (the sampler's start on resume).
        sums: ``(loss, loss_ce, loss_bbox, loss_giou, steps, images)`` summed over the steps taken.
        skipped: unusable images met in the epoch.
    """

    position: int = 0
    sums: tuple[float, ...] = (0.0,) * 6
    skipped: int = 0


class StepHooks(Protocol):
    """What the caller does between steps; called on every worker at the same steps."""

    def checkpoint_due(self, step: int) -> bool:
        """This worker's vote for a checkpoint after ``step``; any vote makes every worker checkpoint."""

    def after_step(self, step: int, losses: dict[str, float], skipped: Sequence[BadImage]) -> None:
        """``losses``: this step's loss terms averaged over the workers; ``skipped``: this worker's unusable images."""

    def checkpoint(self, step: int, progress: EpochProgress) -> None:
        """Save a mid-epoch checkpoint after ``step``."""


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


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


_LOSS_NAMES = ("loss", "loss_ce", "loss_bbox", "loss_giou")
# Per-step all-reduce: non-finite flag, checkpoint votes, skipped images, workers that trained, loss terms.
_NONFINITE, _VOTES, _SKIPPED, _TRAINED, _LOSSES = 0, 1, 2, 3, slice(4, 8)


def train_one_epoch(
    model: nn.Module,
    criterion: SetCriterion,
    loader: Iterable[DetectionBatch],
    optimizer: torch.optim.Optimizer,
    config: FinetuneConfig,
    device: torch.device,
    epoch: int,
    step: int,
    autocast: ContextManager | None = None,
    scaler: torch.amp.GradScaler | None = None,
    *,
    progress: EpochProgress = EpochProgress(),
    hooks: StepHooks | None = None,
    dataset_size: int | None = None,
) -> tuple[dict[str, float], int]:
    """One pass over this worker's shard (the rest of it, when ``progress`` resumes a checkpoint).

    Unusable images are left out of their batch and logged, one line each; a batch left without
    images steps with a zero loss, so every worker still takes part in DDP's gradient all-reduce.

    Args:
        progress: where a mid-epoch checkpoint left the epoch (its sums count towards the epoch's metrics).
        hooks: checkpoint votes and saves, per-step logging (None: none).
        dataset_size: the training set's size, for ``--max-bad-fraction`` (None: no limit).
    Returns:
        The epoch's metrics averaged over all workers' steps (``loss`` - the weighted total -
        ``loss_ce``, ``loss_bbox``, ``loss_giou`` of the last decoder layer, ``images`` trained on and
        ``skipped_images`` in the epoch, ``images_per_second`` summed over workers) and the global step
        count after the epoch.
    Raises:
        NonFiniteLossError: on every worker as soon as any worker's loss is NaN or infinite.
        TooManyBadImagesError: on every worker as soon as more than ``--max-bad-fraction`` of the
            training set has proved unusable in this epoch.
    """
    model.train()
    criterion.train()
    world_size = _world_size()
    sums = torch.zeros(len(_LOSS_NAMES) + 2, dtype=torch.float64)  # + steps, images: this worker, this session
    position, skipped = progress.position, progress.skipped
    limit = config.max_bad_fraction * dataset_size if dataset_size is not None else math.inf
    start = time.perf_counter()
    for batch in loader:
        for bad in batch.skipped:
            logger.warning("skipped training image %s", bad.reason)
        trained = batch.pixel_values is not None
        pixel_values, pixel_mask, targets = batch[:3] if trained else _stand_in_batch()
        pixel_values = pixel_values.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        pixel_mask = pixel_mask.to(device, non_blocking=True)
        targets = [{"labels": t["labels"].to(device), "boxes": t["boxes"].to(device)} for t in targets]
        with autocast or nullcontext():
            outputs = model(pixel_values, pixel_mask)
        losses = criterion(_to_float32(outputs), targets)
        loss = weighted_total(losses, config.loss.loss_weights) * (1.0 if trained else 0.0)
        vote = hooks is not None and hooks.checkpoint_due(step + 1)
        local = [float(not math.isfinite(loss.item())), float(vote), float(len(batch.skipped)), float(trained)]
        local += [loss.item(), *(losses[n].item() for n in _LOSS_NAMES[1:])] if trained else [0.0] * 4
        # Every worker must stop at the same step, or the healthy ones would wait forever in all-reduce.
        reduced = _all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=device)).cpu()
        if reduced[_NONFINITE] > 0:
            terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items() if not k[-1].isdigit())
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch}, step {step} (loss={loss.item():.4g}; {terms}); "
                f"lower --lr or use --precision fp32"
            )
        skipped += int(reduced[_SKIPPED].item())
        if skipped > limit:
            raise TooManyBadImagesError(
                f"{skipped} training images of epoch {epoch} are unusable, more than --max-bad-fraction "
                f"{config.max_bad_fraction:g} of {dataset_size}; the log has a line for each "
                f"('skipped training image ...')"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if config.clip_max_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.clip_max_norm)
        any_trained = reduced[_TRAINED] > 0  # else AdamW's decay and moments would move on zero gradients
        if scaler is not None:
            if any_trained:
                scaler.step(optimizer)
            scaler.update()
        elif any_trained:
            optimizer.step()
        step += 1
        position += batch.samples * world_size  # every worker draws as many samples (the sampler pads)
        if dataset_size is not None:
            position = min(position, dataset_size)
        if trained:
            sums += torch.tensor([*local[_LOSSES], 1.0, float(len(targets))], dtype=torch.float64)
        if hooks is not None:
            workers = max(reduced[_TRAINED].item(), 1.0)
            means = {n: reduced[_LOSSES][i].item() / workers for i, n in enumerate(_LOSS_NAMES)}
            hooks.after_step(step, means, batch.skipped)
            if reduced[_VOTES] > 0:
                hooks.checkpoint(step, EpochProgress(position, _global_sums(sums, progress, device), skipped))
    elapsed = time.perf_counter() - start
    session_images = _all_reduce_sum(sums[-1:].clone().to(device)).cpu().item()
    totals = _global_sums(sums, progress, device)
    steps = max(totals[-2], 1.0)
    metrics = {n: totals[i] / steps for i, n in enumerate(_LOSS_NAMES)}
    metrics["images"] = int(totals[-1])
    metrics["skipped_images"] = skipped
    metrics["images_per_second"] = session_images / max(elapsed, 1e-9)
    return metrics, step


def _global_sums(sums: Tensor, progress: EpochProgress, device: torch.device) -> tuple[float, ...]:
    """This session's sums of every worker plus those a resumed checkpoint carried."""
    reduced = _all_reduce_sum(sums.clone().to(device)).cpu()
    return tuple(float(a + b) for a, b in zip(reduced.tolist(), progress.sums))


def _stand_in_batch() -> tuple[Tensor, Tensor, list[dict]]:
    """One black 32 x 32 image without objects: the forward pass of a batch whose images were all unusable
    (its loss is multiplied by 0, so it only keeps this worker in step with the others)."""
    target = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    return torch.zeros(1, 3, 32, 32), torch.ones(1, 32, 32, dtype=torch.bool), [target]


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
    batches: Iterable[DetectionBatch],
    device: torch.device,
    autocast: ContextManager | None = None,
) -> np.ndarray:
    """Every query's best class and box for each image.

    Args:
        model: the (unwrapped) DETR, put in eval mode here.
        batches: :class:`DetectionBatch` es with ``image_id`` and ``orig_size`` (height, width) in each
            target; unusable images are logged and get no detections.
    Returns:
        float64 ``[D, 7]`` rows ``(image_id, category_id, x, y, width, height, score)``, boxes as absolute
        xywh pixels of the original image.
    """
    model.eval()
    category_ids = torch.tensor([c.id for c in model.categories], dtype=torch.float64)
    rows = []
    for batch in batches:
        for bad in batch.skipped:
            logger.warning("skipped validation image %s", bad.reason)
        if batch.pixel_values is None:
            continue
        pixel_values, pixel_mask, targets = batch.pixel_values, batch.pixel_mask, batch.targets
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
