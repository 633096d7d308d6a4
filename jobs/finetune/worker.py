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

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

import detr
from coco import CocoInstances
from detr import DETR, Category, DetrConfig, SetCriterion
from detr.checkpoint import read_state, save_pretrained, unwrap
from jobs.finetune.data import CocoDetectionDataset, read_training_set
from jobs.finetune.engine import (
    NonFiniteLossError,
    build_optimizer,
    collate_detection_batch,
    evaluate,
    train_one_epoch,
)
from jobs.finetune.settings import FinetuneConfig
from jobs.finetune.transforms import AugmentationConfig, eval_transform, train_transform

MODEL_FILE = "model.pth"
STATE_FILE = "training_state.pt"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingSpec:
    """What the driver hands every worker besides the initial weights (pickled to each of them).

    Args:
        config: the run's config.
        model: the architecture to build (the starting weights' or the flags').
        categories: class index -> dataset category.
    """

    config: FinetuneConfig
    model: DetrConfig
    categories: tuple[Category, ...]

    @property
    def augmentation(self) -> AugmentationConfig:
        return AugmentationConfig.scaled(self.config.min_size, self.config.max_size, self.config.augmentation)


def _loader(dataset: Any, config: FinetuneConfig, sampler: Any, cuda: bool) -> DataLoader:
    workers = config.loader_workers
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        collate_fn=collate_detection_batch,
        num_workers=workers,
        pin_memory=cuda,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


def build_loaders(
    spec: TrainingSpec,
    rank: int,
    world_size: int,
    cuda: bool,
) -> tuple[DataLoader, DataLoader | None, CocoInstances | None]:
    """This worker's shard of the training set (a ``DistributedSampler``), its slice of the validation
    set and the validation ground truth (None without a validation set)."""
    config = spec.config
    train_set = CocoDetectionDataset(
        config.train_images, read_training_set(config.train_annotations), train_transform(spec.augmentation)
    )
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=config.seed)
    train_loader = _loader(train_set, config, sampler, cuda)
    if config.val_annotations is None or config.val_images is None:
        return train_loader, None, None
    validation = read_training_set(config.val_annotations)
    val_set = CocoDetectionDataset(config.val_images, validation, eval_transform(spec.augmentation))
    # A strided slice, not DistributedSampler: its padding would score some images twice.
    val_slice = Subset(val_set, list(range(rank, len(val_set), world_size)))
    return train_loader, _loader(val_slice, config, None, cuda), validation.instances


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    state: dict,
) -> None:
    """``model.pth`` (loadable by :func:`detr.from_pretrained`) and ``training_state.pt``."""
    save_pretrained(unwrap(model), str(folder / MODEL_FILE))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            **state,
        },
        folder / STATE_FILE,
    )


def load_checkpoint(folder: Path) -> tuple[dict[str, Tensor], dict]:
    """Model state dict and training state of a checkpoint directory (no pickled code is run)."""
    model_state, _ = read_state(str(folder / MODEL_FILE))
    training_state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    return model_state, training_state


def build_model(spec: TrainingSpec, initial_state: dict[str, Tensor]) -> tuple[DETR, SetCriterion]:
    """The DETR to train and its criterion (:func:`detr.build`): ``initial_state`` loaded, the backbone
    frozen if asked, and the weights in channels-last memory, which oneDNN (CPU) and cuDNN (GPU)
    convolve faster (benchmarks/RESULTS.md). Saved state dicts are the same either way."""
    model, criterion = detr.build(spec.model, spec.config.loss, spec.categories)
    model.load_state_dict(initial_state)
    if spec.config.freeze_backbone:
        model.backbone.requires_grad_(False)
    return model.to(memory_format=torch.channels_last), criterion


def train_loop_per_worker(loop_config: dict) -> dict:
    """Ray Train's per-worker function.

    Args:
        loop_config: ``spec`` (a :class:`TrainingSpec`) and ``initial_weights`` (an ObjectRef to the starting
            state dict, ignored when resuming from a checkpoint).
    Returns:
        ``{"history": [per-epoch metrics], "error": None or the non-finite-loss message}``; the driver
        turns an error into an exception (returning it instead of raising spares retries of a run that diverged).
    """
    spec: TrainingSpec = loop_config["spec"]
    config = spec.config
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
        model_state, training_state = ray.get(loop_config["initial_weights"]), None
    model, criterion = build_model(spec, model_state)
    model, criterion = ray.train.torch.prepare_model(model), criterion.to(device)
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, config.lr_drop)
    autocast = detr.precision.autocast(config.precision, device)
    scaler = (
        torch.amp.GradScaler(device.type) if autocast is not None and autocast.fast_dtype == torch.float16 else None
    )
    start_epoch, step = 0, 0
    if training_state is not None:
        optimizer.load_state_dict(training_state["optimizer"])
        scheduler.load_state_dict(training_state["scheduler"])
        if scaler is not None and training_state["scaler"] is not None:
            scaler.load_state_dict(training_state["scaler"])
        start_epoch, step, history = training_state["epoch"], training_state["step"], list(training_state["history"])
    train_loader, val_loader, val_instances = build_loaders(spec, rank, world_size, cuda)

    for epoch in range(start_epoch, config.epochs):
        torch.manual_seed(config.seed + 1000 * epoch + rank)  # augmentation draws; same after a resume
        train_loader.sampler.set_epoch(epoch)
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        try:
            metrics, step = train_one_epoch(
                model, criterion, train_loader, optimizer, config, device, epoch, step, autocast, scaler
            )
        except NonFiniteLossError as error:
            return {"history": history, "error": str(error)}
        scheduler.step()
        if val_loader is not None and val_instances is not None:
            metrics |= evaluate(model, val_loader, val_instances, device, autocast)
        metrics |= {
            "epoch": epoch,
            "step": step,
            "lr": lr,
            "resumed_from_epoch": start_epoch,
            "epoch_seconds": time.perf_counter() - started,
        }
        history.append(metrics)
        if rank == 0:
            logger.info(format_epoch(metrics, config.epochs))  # print() would be echoed twice by Ray Train
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                save_checkpoint(
                    Path(folder),
                    model,
                    optimizer,
                    scheduler,
                    scaler,
                    {"epoch": epoch + 1, "step": step, "history": history},
                )
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None,
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
