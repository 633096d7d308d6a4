"""The per-worker side of DETR fine-tuning: data shards, one epoch, validation, checkpoints.

:func:`train_loop_per_worker` runs inside each Ray Train worker. It resumes from
``ray.train.get_checkpoint()`` when there is one (after a worker failure, or when a run is
started again on the same storage), otherwise from the initial weights the driver put in
the object store. After every epoch rank 0 writes a checkpoint directory - ``model.pth``
(:func:`detr.save_pretrained`'s layout: weights, config, class table) and ``training_state.pt``
(optimizer, scheduler, grad scaler, epoch, step, metric history) - and every rank reports
the epoch's metrics with it, so a failure costs at most the epoch in progress.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Sequence

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from detr.categories import Category, categories_from_list
from detr.checkpoint import read_state, save_pretrained
from detr.config import DetrConfig
from detr.criterion import SetCriterion, weighted_total
from detr.matcher import HungarianMatcher
from detr.model import DETR
from detr.preprocess import collate
from jobs.coco_dataset import CocoAnnotations, CocoDetectionDataset, read_coco_annotations
from jobs.detection_transforms import AugmentationConfig, eval_transform, train_transform
from jobs.validation import coco_box_ap, gather_rows, predict_detections

MODEL_FILE = "model.pth"
STATE_FILE = "training_state.pt"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the epoch and step."""


@dataclass(frozen=True)
class TrainSettings:
    """Everything a worker needs besides the initial weights; plain values so it pickles to workers.

    Loss and cost weights follow DETR (class 1, L1 box 5, GIoU 2; no-object weight ``eos_coef``).
    """

    train_images: str
    train_annotations: str
    model_config: dict
    categories: list[dict]
    val_images: str | None = None
    val_annotations: str | None = None
    epochs: int = 300
    batch_size: int = 2  # images per worker and step
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1  # 0 disables clipping
    lr_drop: int = 200  # epochs between 10x learning-rate drops
    eos_coef: float = 0.1
    loss_weights: dict = field(default_factory=lambda: {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0})
    cost_weights: dict = field(default_factory=lambda: {"cost_class": 1.0, "cost_bbox": 5.0, "cost_giou": 2.0})
    precision: str = "fp32"
    freeze_backbone: bool = False
    augmentation: dict = field(default_factory=lambda: dataclasses.asdict(AugmentationConfig()))
    loader_workers: int = 2  # DataLoader processes per Ray Train worker
    seed: int = 42

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")


def collate_detection_batch(samples: Sequence[tuple[Tensor, dict]]) -> tuple[Tensor, Tensor, list[dict]]:
    """uint8 images of any sizes -> normalized, padded ``pixel_values`` [B, 3, H, W], ``pixel_mask`` [B, H, W]."""
    images, targets = zip(*samples)
    batch = collate(list(images), [t["orig_size"] for t in targets])
    return batch.pixel_values, batch.pixel_mask, list(targets)


def _loader(dataset: Any, settings: TrainSettings, sampler: Any, cuda: bool) -> DataLoader:
    workers = settings.loader_workers
    return DataLoader(
        dataset, batch_size=settings.batch_size, sampler=sampler, collate_fn=collate_detection_batch, num_workers=workers,
        pin_memory=cuda, persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
    )


def build_loaders(
    settings: TrainSettings, rank: int, world_size: int, cuda: bool,
) -> tuple[DataLoader, DataLoader | None, CocoAnnotations | None]:
    """This worker's shard of the training set (a ``DistributedSampler``), its slice of the validation
    set and the validation annotations (None without a validation set)."""
    augmentation = AugmentationConfig.from_dict(settings.augmentation)
    train_set = CocoDetectionDataset(
        settings.train_images, read_coco_annotations(settings.train_annotations), train_transform(augmentation)
    )
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=settings.seed)
    train_loader = _loader(train_set, settings, sampler, cuda)
    if settings.val_annotations is None or settings.val_images is None:
        return train_loader, None, None
    val_annotations = read_coco_annotations(settings.val_annotations)
    val_set = CocoDetectionDataset(settings.val_images, val_annotations, eval_transform(augmentation))
    # A strided slice, not DistributedSampler: its padding would score some images twice.
    val_slice = Subset(val_set, list(range(rank, len(val_set), world_size)))
    return train_loader, _loader(val_slice, settings, None, cuda), val_annotations


def parameter_groups(model: nn.Module, settings: TrainSettings) -> list[dict]:
    """AdamW groups: backbone parameters at ``lr_backbone``, the rest at ``lr`` (frozen ones left out)."""
    backbone = [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]
    groups = [{"params": rest, "lr": settings.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": settings.lr_backbone})
    return groups


def build_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups`, fused: one pass over the ~40M trained parameters per step
    instead of a dozen (85 -> 29 ms of a 2.3 s R50 step on one CPU thread; same update)."""
    return torch.optim.AdamW(parameter_groups(model, settings), weight_decay=settings.weight_decay, fused=True)


def _unwrap(model: nn.Module) -> DETR:
    return model.module if hasattr(model, "module") else model


def _all_reduce_sum(values: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    return values


def train_one_epoch(
    model: nn.Module, criterion: SetCriterion, loader: DataLoader, optimizer: torch.optim.Optimizer,
    settings: TrainSettings, device: torch.device, epoch: int, step: int,
    autocast: ContextManager | None = None, scaler: torch.amp.GradScaler | None = None,
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
        loss = weighted_total(losses, settings.loss_weights)
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
        if settings.clip_max_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), settings.clip_max_norm)
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


def validate(model: nn.Module, loader: DataLoader, annotations: CocoAnnotations, device: torch.device,
             autocast: ContextManager | None = None) -> dict[str, float]:
    """COCO stats of the model on the whole validation set (each worker predicts its slice), keyed ``val_AP`` etc."""
    rows = gather_rows(predict_detections(_unwrap(model), loader, device, autocast))
    return {f"val_{k}": v for k, v in coco_box_ap(annotations, rows).items()}


def save_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None,
                    state: dict) -> None:
    """``model.pth`` (loadable by :func:`detr.from_pretrained`) and ``training_state.pt``."""
    save_pretrained(_unwrap(model), str(folder / MODEL_FILE))
    torch.save({
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None, **state,
    }, folder / STATE_FILE)


def load_checkpoint(folder: Path) -> tuple[dict[str, Tensor], dict]:
    """Model state dict and training state of a checkpoint directory (no pickled code is run)."""
    model_state, _ = read_state(str(folder / MODEL_FILE))
    training_state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    return model_state, training_state


def build_model(settings: TrainSettings, initial_state: dict[str, Tensor]) -> DETR:
    """The DETR to train: ``initial_state`` loaded, the backbone frozen if asked, and its weights in
    channels-last memory, which oneDNN (CPU) and cuDNN (GPU) convolve faster - 13% of an R50 training
    step on CPU (benchmarks/bench_finetune.py). Saved state dicts are the same either way."""
    categories: tuple[Category, ...] = categories_from_list(settings.categories)
    model = DETR(DetrConfig.from_dict(settings.model_config), categories)
    model.load_state_dict(initial_state)
    if settings.freeze_backbone:
        model.backbone.requires_grad_(False)
    return model.to(memory_format=torch.channels_last)


def train_loop_per_worker(config: dict) -> dict:
    """Ray Train's per-worker function.

    Args:
        config: ``settings`` (a :class:`TrainSettings` as a dict) and ``initial_weights`` (an ObjectRef to
            the starting state dict, ignored when resuming from a checkpoint).
    Returns:
        ``{"history": [per-epoch metrics], "error": None or the non-finite-loss message}``; the driver
        turns an error into an exception (returning it instead of raising spares retries of a run that diverged).
    """
    settings = TrainSettings(**config["settings"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    checkpoint = ray.train.get_checkpoint()
    history: list[dict] = []
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            model_state, training_state = load_checkpoint(Path(folder))
    else:
        model_state, training_state = ray.get(config["initial_weights"]), None
    model = ray.train.torch.prepare_model(build_model(settings, model_state))
    optimizer = build_optimizer(model, settings)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, settings.lr_drop)
    dtype = PRECISIONS[settings.precision]
    scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else None
    start_epoch, step = 0, 0
    if training_state is not None:
        optimizer.load_state_dict(training_state["optimizer"])
        scheduler.load_state_dict(training_state["scheduler"])
        if scaler is not None and training_state["scaler"] is not None:
            scaler.load_state_dict(training_state["scaler"])
        start_epoch, step, history = training_state["epoch"], training_state["step"], list(training_state["history"])
    matcher = HungarianMatcher(**settings.cost_weights)
    criterion = SetCriterion(len(settings.categories), matcher, settings.eos_coef).to(device)
    train_loader, val_loader, val_annotations = build_loaders(settings, rank, world_size, cuda)

    for epoch in range(start_epoch, settings.epochs):
        torch.manual_seed(settings.seed + 1000 * epoch + rank)  # augmentation draws; same after a resume
        train_loader.sampler.set_epoch(epoch)
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        try:
            metrics, step = train_one_epoch(
                model, criterion, train_loader, optimizer, settings, device, epoch, step, autocast, scaler
            )
        except NonFiniteLossError as error:
            return {"history": history, "error": str(error)}
        scheduler.step()
        if val_loader is not None and val_annotations is not None:
            metrics |= validate(model, val_loader, val_annotations, device, autocast)
        metrics |= {"epoch": epoch, "step": step, "lr": lr, "resumed_from_epoch": start_epoch,
                    "epoch_seconds": time.perf_counter() - started}
        history.append(metrics)
        if rank == 0:
            logger.info(format_epoch(metrics, settings.epochs))  # print() would be echoed twice by Ray Train
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                save_checkpoint(Path(folder), model, optimizer, scheduler, scaler,
                                {"epoch": epoch + 1, "step": step, "history": history})
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None,
                checkpoint_dir_name=f"epoch_{epoch:04d}",
            )
    return {"history": history, "error": None}


def format_epoch(metrics: dict, epochs: int) -> str:
    """One progress line per epoch."""
    line = (
        f"epoch {metrics['epoch'] + 1}/{epochs}: loss {metrics['loss']:.4f} (ce {metrics['loss_ce']:.4f}, "
        f"bbox {metrics['loss_bbox']:.4f}, giou {metrics['loss_giou']:.4f}) lr {metrics['lr']:.2e} "
        f"{metrics['images_per_second']:.1f} img/s {metrics['epoch_seconds']:.1f}s"
    )
    if "val_AP" in metrics:
        line += f" | val AP {metrics['val_AP']:.4f} AP50 {metrics['val_AP50']:.4f}"
    return line
