"""The per-worker side of DETR fine-tuning: data shards, epochs, validation, checkpoints, resume.

:func:`train_loop_per_worker` runs inside each Ray Train worker. It resumes from
``ray.train.get_checkpoint()`` when there is one (after a worker failure, or when a run is
started again on the same storage), otherwise from the initial weights the driver put in
the object store. Rank 0 writes a checkpoint (:mod:`jobs.finetune.run_state`) after every epoch
and, within an epoch, every ``--checkpoint-every-steps`` steps or ``--checkpoint-every-minutes``
minutes; every rank reports it, and Ray Train uploads it in a background thread
(``CheckpointUploadMode.ASYNC``) while training goes on. A resume starts at the sample where the
checkpoint was taken (:class:`jobs.finetune.sampler.EpochSampler`) with each worker's RNG state
restored, so a failure costs at most the steps since the last checkpoint.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointUploadMode
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

import detr
from coco import CocoInstances
from detr import Category, DetrConfig
from jobs.finetune.curves import TrainingCurves
from jobs.finetune.data import BadImage, CocoDetectionDataset, read_training_set
from jobs.finetune.engine import (
    EpochProgress,
    NonFiniteLossError,
    TooManyBadImagesError,
    build_model,
    build_optimizer,
    collate_detection_batch,
    evaluate,
    train_one_epoch,
)
from jobs.finetune.run_state import RunProgress, load_checkpoint, save_checkpoint
from jobs.finetune.sampler import EpochSampler
from jobs.finetune.settings import FinetuneConfig
from jobs.finetune.transforms import AugmentationConfig, eval_transform, train_transform

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingSpec:
    """What the driver hands every worker besides the initial weights (pickled to each of them).

    Args:
        config: the run's config.
        model: the architecture to build (the starting weights' or the flags').
        categories: class index -> dataset category.
        fingerprint: the settings that change results, stored in every checkpoint.
    """

    config: FinetuneConfig
    model: DetrConfig
    categories: tuple[Category, ...]
    fingerprint: dict

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
        # Its own generator: creating an iterator then does not draw from the global one (dropout's).
        generator=torch.Generator().manual_seed(config.seed),
    )


def build_loaders(
    spec: TrainingSpec,
    rank: int,
    world_size: int,
    cuda: bool,
) -> tuple[DataLoader, DataLoader | None, CocoInstances | None]:
    """This worker's shard of the training set (an :class:`EpochSampler`), its slice of the validation
    set and the validation ground truth (None without a validation set). Unusable images are skipped."""
    config = spec.config
    train_set = CocoDetectionDataset(
        config.train_images,
        read_training_set(config.train_annotations),
        train_transform(spec.augmentation),
        skip_bad_images=True,
    )
    sampler = EpochSampler(len(train_set), rank, world_size, config.seed)
    train_loader = _loader(train_set, config, sampler, cuda)
    if config.val_annotations is None or config.val_images is None:
        return train_loader, None, None
    validation = read_training_set(config.val_annotations)
    val_set = CocoDetectionDataset(
        config.val_images, validation, eval_transform(spec.augmentation), skip_bad_images=True
    )
    # A strided slice, not a padded sampler: padding would score some images twice.
    val_slice = Subset(val_set, list(range(rank, len(val_set), world_size)))
    return train_loader, _loader(val_slice, config, None, cuda), validation.instances


def _gather(value: Any) -> list[Any]:
    """Every worker's ``value`` (index = rank), on every worker."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _rng_state(cuda: bool) -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if cuda:
        state["cuda"] = torch.cuda.get_rng_state()
    return state


class Checkpoints:
    """Rank 0 writes, every rank reports: after each epoch, and mid-epoch when a step or time budget is due.

    It is also the :class:`jobs.finetune.engine.StepHooks` of :func:`train_one_epoch`: the checkpoint
    votes (steps on every rank, minutes by rank 0's clock), the per-step loss curves, the mid-epoch saves.
    """

    def __init__(
        self,
        spec: TrainingSpec,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler | None,
        progress: RunProgress,
        dataset_size: int,
        cuda: bool,
    ) -> None:
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.spec, self.model, self.optimizer, self.scheduler, self.scaler = spec, model, optimizer, scheduler, scaler
        self.progress, self.dataset_size, self.cuda = progress, dataset_size, cuda
        self.curves = TrainingCurves(spec.config.output, progress.step) if self.rank == 0 else None
        self.skipped: set[str] = set(progress.skipped_images)
        self.last = time.monotonic()
        self.save_seconds: list[float] = []

    def checkpoint_due(self, step: int) -> bool:
        config = self.spec.config
        if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
            return True
        minutes = config.checkpoint_every_minutes
        return bool(minutes) and self.rank == 0 and time.monotonic() - self.last >= 60 * minutes

    def after_step(self, step: int, losses: dict[str, float], skipped: Sequence[BadImage]) -> None:
        self.skipped.update(bad.reason for bad in skipped)
        if self.curves is not None and step % self.spec.config.log_every_steps == 0:
            self.curves.add_step(step, losses)

    def checkpoint(self, step: int, progress: EpochProgress) -> None:
        if progress.position >= self.dataset_size:
            return  # the epoch's last step: its end-of-epoch checkpoint follows at once
        state = replace(
            self.progress,
            position=progress.position,
            step=step,
            epoch_sums=progress.sums,
            epoch_skipped=progress.skipped,
        )
        metrics = {"epoch": state.epoch, "step": step, "position": progress.position}
        if self.spec.config.val_annotations is not None:
            metrics["val_AP"] = float("-inf")  # ranks below every epoch's AP: best.pth is an epoch end
        started = time.perf_counter()
        self.save(state, metrics, f"epoch_{state.epoch:04d}_step_{step:08d}")
        self.save_seconds.append(time.perf_counter() - started)

    def save(self, progress: RunProgress, metrics: dict, name: str) -> None:
        """Write (rank 0) and report (every rank) a checkpoint; Ray Train uploads it in the background."""
        rng_states = _gather(_rng_state(self.cuda))
        self.skipped.update(*_gather(sorted(self.skipped)))
        self.progress = replace(progress, world_size=self.world_size, skipped_images=tuple(sorted(self.skipped)))
        checkpoint = None
        if self.rank == 0:
            # Not a TemporaryDirectory: the background upload deletes it once copied.
            folder = Path(tempfile.mkdtemp(prefix="detr-ray-checkpoint-"))
            save_checkpoint(folder, self.model, self.optimizer, self.scheduler, self.scaler, rng_states, self.progress)
            checkpoint = ray.train.Checkpoint.from_directory(str(folder))
        ray.train.report(
            metrics,
            checkpoint=checkpoint,
            checkpoint_dir_name=name,
            checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
        )
        self.last = time.monotonic()
        if self.curves is not None:
            self.curves.publish(self.progress.history)

    def close(self) -> None:
        if self.curves is not None:
            self.curves.close(self.progress.history)


def train_loop_per_worker(loop_config: dict) -> dict:
    """Ray Train's per-worker function.

    Args:
        loop_config: ``spec`` (a :class:`TrainingSpec`) and ``initial_weights`` (an ObjectRef to the starting
            state dict, ignored when resuming from a checkpoint).
    Returns:
        ``{"history": [per-epoch metrics], "error": None or the message}``; the driver turns an error
        (a diverged loss, too many unusable images) into an exception: returning it instead of raising
        spares retries of a run that would fail the same way again.
    """
    spec: TrainingSpec = loop_config["spec"]
    config = spec.config
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            model_state, training_state, progress = load_checkpoint(Path(folder))
    else:
        model_state, training_state = ray.get(loop_config["initial_weights"]), None
        progress = RunProgress(spec.fingerprint, world_size=world_size)
    model, criterion = build_model(spec.config, spec.model, spec.categories, model_state)
    model, criterion = ray.train.torch.prepare_model(model), criterion.to(device)
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, config.lr_drop)
    autocast = detr.precision.autocast(config.precision, device)
    scaler = (
        torch.amp.GradScaler(device.type) if autocast is not None and autocast.fast_dtype == torch.float16 else None
    )
    if training_state is not None:
        optimizer.load_state_dict(training_state["optimizer"])
        scheduler.load_state_dict(training_state["scheduler"])
        if scaler is not None and training_state["scaler"] is not None:
            scaler.load_state_dict(training_state["scaler"])
    train_loader, val_loader, val_instances = build_loaders(spec, rank, world_size, cuda)
    dataset_size = len(train_loader.dataset)
    checkpoints = Checkpoints(spec, model, optimizer, scheduler, scaler, progress, dataset_size, cuda)
    resumed = {"resumed_from_epoch": progress.epoch, "resumed_from_step": progress.step}
    resumed["resumed_at_position"] = progress.position
    if rank == 0 and checkpoint is not None:
        logger.info(
            "resuming at epoch %d, step %d, sample %d of the epoch", progress.epoch, progress.step, progress.position
        )
    history, step = list(progress.history), progress.step

    for epoch in range(progress.epoch, config.epochs):
        mid_epoch = epoch == progress.epoch and progress.position > 0
        rng = training_state.get("rng_states", []) if training_state is not None else []
        if mid_epoch and len(rng) == world_size:  # dropout continues as if never interrupted
            torch.set_rng_state(rng[rank]["cpu"])
            if cuda and "cuda" in rng[rank]:
                torch.cuda.set_rng_state(rng[rank]["cuda"])
        else:
            torch.manual_seed(config.seed + 1000 * epoch + rank)
        epoch_progress = progress.epoch_progress if mid_epoch else EpochProgress()
        train_loader.sampler.set_epoch(epoch, epoch_progress.position)
        checkpoints.progress = replace(checkpoints.progress, epoch=epoch, history=tuple(history))
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        try:
            metrics, step = train_one_epoch(
                model,
                criterion,
                train_loader,
                optimizer,
                config,
                device,
                epoch,
                step,
                autocast,
                scaler,
                progress=epoch_progress,
                hooks=checkpoints,
                dataset_size=dataset_size,
            )
        except (NonFiniteLossError, TooManyBadImagesError) as error:
            checkpoints.close()
            return {"history": history, "error": str(error)}
        scheduler.step()
        if val_loader is not None and val_instances is not None:
            metrics |= evaluate(model, val_loader, val_instances, device, autocast)
        metrics |= {"epoch": epoch, "step": step, "lr": lr, **resumed, "epoch_seconds": time.perf_counter() - started}
        metrics["mid_epoch_checkpoints"] = len(checkpoints.save_seconds)
        metrics["checkpoint_seconds"] = sum(checkpoints.save_seconds)  # training time they took (not the upload)
        checkpoints.save_seconds.clear()
        history.append(metrics)
        if rank == 0:
            logger.info(format_epoch(metrics, config.epochs))  # print() would be echoed twice by Ray Train
            checkpoints.curves.add_epoch(metrics)
        done = RunProgress(spec.fingerprint, epoch=epoch + 1, step=step, history=tuple(history))
        report = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        checkpoints.save(done, report, f"epoch_{epoch:04d}")
    checkpoints.close()
    return {"history": history, "error": None}


def format_epoch(metrics: dict, epochs: int) -> str:
    """One progress line per epoch."""
    line = (
        f"epoch {metrics['epoch'] + 1}/{epochs}: loss {metrics['loss']:.4f} (ce {metrics['loss_ce']:.4f}, "
        f"bbox {metrics['loss_bbox']:.4f}, giou {metrics['loss_giou']:.4f}) lr {metrics['lr']:.2e} "
        f"{metrics['images_per_second']:.1f} img/s {metrics['epoch_seconds']:.1f}s"
    )
    if metrics.get("skipped_images"):
        line += f", {metrics['skipped_images']} unusable images skipped"
    if "val_AP" in metrics:
        line += f" | val AP {metrics['val_AP']:.4f} AP50 {metrics['val_AP50']:.4f}"
    return line
