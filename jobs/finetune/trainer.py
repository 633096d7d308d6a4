"""The finetune job's driver: checks the inputs, decides whether to resume, runs Ray Train, writes outputs.

Every worker trains on its shard of the images; rank 0 checkpoints under ``--checkpoint-dir``
(default ``OUTPUT/checkpoints``) after each epoch and within epochs (:mod:`jobs.finetune.worker`),
and a failed worker restarts the run from the latest checkpoint (``--max-failures``). Starting the
job again on the same run folder resumes it - but only if the latest checkpoint's settings
fingerprint (:mod:`jobs.finetune.fingerprint`) matches the command line's: this is checked here,
before Ray Train starts, so a mismatch is one line and exit status 2, never a retry. A finished
run is not trained again (its outputs are rewritten); ``--restart`` deletes the run and starts over.

At the end ``OUTPUT/final.pth`` (last epoch), ``OUTPUT/best.pth`` (best validation AP, else the
last epoch), ``OUTPUT/hub/`` (best.pth in the Hugging Face layout) and ``OUTPUT/metrics.json`` are
written; the ``.pth`` weights load with ``detr.from_pretrained`` and carry the dataset's class
names and ids (``jobs.annotate --weights``). ``OUTPUT/tensorboard/`` and ``OUTPUT/curves.png``
are written as training goes (:mod:`jobs.finetune.curves`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

import detr
from detr.categories import Category, categories_to_list
from jobs.cli import JobFailedError
from jobs.finetune.curves import CURVES_PNG, TENSORBOARD
from jobs.finetune.data import TrainingSet, read_training_set
from jobs.finetune.fingerprint import check_resumable, fingerprint_digest, run_fingerprint
from jobs.finetune.run_state import MODEL_FILE, PROGRESS_FILE, RunProgress
from jobs.finetune.settings import FinetuneConfig, FinetuneInputError
from jobs.finetune.worker import TrainingSpec, train_loop_per_worker
from storage import arrow_filesystem, filesystem_for, is_local, write_bytes

# What a run writes to OUTPUT (besides the run folder); --restart deletes exactly these.
OUTPUT_NAMES = ("final.pth", "best.pth", "hub", "metrics.json", CURVES_PNG, TENSORBOARD)


class TrainingFailedError(JobFailedError):
    """The run diverged or its workers failed more often than ``--max-failures`` allows."""

    headline = "training failed"


@dataclass(frozen=True)
class FinetuneResult:
    """What ``OUTPUT/metrics.json`` holds, and the line printed at the end."""

    metrics: dict

    def summary(self) -> str:
        m = self.metrics
        line = (
            f"wrote {m['final']}, {m['best']} (epoch {m['best_epoch']}), {m['hub']} (transformers layout) "
            f"and {m['output']}/metrics.json"
        )
        if m["skipped_images"]:
            line += f"; {m['skipped_images']} unusable training images skipped (listed in metrics.json)"
        return f"already complete: {line}" if m["already_complete"] else line


def load_dataset(images: str, annotations: str) -> TrainingSet:
    """Parse the annotations and check that the images folder holds the first image."""
    parsed = read_training_set(annotations)
    if not parsed.images:
        raise FinetuneInputError(f"{annotations}: has no images")
    first = f"{images.rstrip('/')}/{parsed.images[0].file_name}"
    fs, path = filesystem_for(first)
    if not fs.exists(path):
        raise FinetuneInputError(f"{first}: image listed in {annotations} not found under --train/val-images {images}")
    return parsed


def initial_model(config: FinetuneConfig, categories: Sequence[Category]) -> detr.DETR:
    """The starting DETR with a class head for ``categories``: random init or pretrained weights."""
    overrides = config.architecture_overrides
    torch.manual_seed(config.seed)
    if config.from_scratch:
        return detr.DETR(_model_config(detr.DetrConfig(), overrides, len(categories)), categories)
    fixed = [flag for flag, field in _FIXED_BY_WEIGHTS.items() if field in overrides]
    if fixed:
        raise FinetuneInputError(
            f"{fixed} only apply with --weights scratch; {config.weights!r} fixes the architecture"
        )
    pretrained = detr.from_pretrained(config.weights, num_classes=len(categories), categories=categories)
    model = detr.DETR(_model_config(pretrained.config, overrides, len(categories)), categories)
    state = pretrained.state_dict()
    if model.config.num_queries != pretrained.config.num_queries:  # new slots: keep all but the query embedding
        state = {k: v for k, v in state.items() if not k.startswith("query_embed.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("query_embed.") for k in missing), (missing, unexpected)
    return model


def _model_config(base: detr.DetrConfig, overrides: dict, num_classes: int) -> detr.DetrConfig:
    try:
        return dataclasses.replace(base, num_classes=num_classes, **overrides)
    except ValueError as error:  # DetrConfig names the field and the value
        raise FinetuneInputError(str(error)) from None


# Flags that pretrained weights fix (all architecture flags but --num-queries and --dropout).
_FIXED_BY_WEIGHTS = {
    "--backbone": "backbone",
    "--hidden-dim": "hidden_dim",
    "--num-heads": "num_heads",
    "--enc-layers": "num_encoder_layers",
    "--dec-layers": "num_decoder_layers",
    "--ffn-dim": "dim_feedforward",
}


def run_storage(uri: str) -> tuple[str, str, object | None]:
    """``(storage_path, run_name, pyarrow filesystem or None)`` for Ray Train's RunConfig from a folder URI."""
    fs, path = filesystem_for(uri)
    path = os.path.abspath(path) if is_local(fs) else path.rstrip("/")
    filesystem = None if is_local(fs) else arrow_filesystem(uri)[0]
    return os.path.dirname(path), os.path.basename(path), filesystem


@dataclass(frozen=True)
class PreviousRun:
    """The checkpoints a run folder already holds: Ray Train's view of them and the latest one's progress
    (None when it has no ``progress.json``: an older version wrote it)."""

    result: Any  # ray.train.Result
    progress: RunProgress | None


def _read_result(run_folder: str) -> Any:
    """``ray.train.Result`` of the checkpoints registered in ``run_folder`` (RuntimeError: none there)."""
    import ray.train

    storage_path, run_name, filesystem = run_storage(run_folder)
    # Its checkpoint manager logs a paragraph about resuming at INFO; the driver's own line says it.
    quiet = logging.getLogger("ray.train.v2._internal.execution.checkpoint.checkpoint_manager")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        return ray.train.Result.from_path(f"{storage_path}/{run_name}", storage_filesystem=filesystem)
    finally:
        quiet.setLevel(level)


def previous_run(run_folder: str) -> PreviousRun | None:
    """What ``run_folder`` holds, read before Ray Train starts (None: no checkpoint was ever registered there)."""
    try:
        result = _read_result(run_folder)
    except RuntimeError as error:
        if "doesn't exist" in str(error):  # no run folder, or no checkpoint manager snapshot in it
            return None
        raise
    if result.checkpoint is None:
        return None
    try:
        with result.checkpoint.filesystem.open_input_stream(f"{result.checkpoint.path}/{PROGRESS_FILE}") as f:
            return PreviousRun(result, RunProgress.from_json(f.read().decode()))
    except FileNotFoundError:
        return PreviousRun(result, None)


def start_over(config: FinetuneConfig) -> None:
    """``--restart``: delete the run folder and what earlier runs wrote to OUTPUT (nothing else there)."""
    output = config.output.rstrip("/")
    targets = [config.run_folder, *(f"{output}/{name}" for name in OUTPUT_NAMES)]
    for uri in targets:
        fs, path = filesystem_for(uri)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    print(f"--restart: deleted {config.run_folder} and {output}/{{{','.join(OUTPUT_NAMES)}}}", flush=True)


def resume_point(config: FinetuneConfig, fingerprint: dict) -> RunProgress | None:
    """The progress training resumes from (None: a new run), after checking the run folder may be resumed.

    Raises:
        RunMismatchError: the run folder holds a run with other settings (names the flags).
        FinetuneInputError: the run there already trained more epochs than ``--epochs``.
    """
    previous = previous_run(config.run_folder)
    if previous is None:
        return None
    stored = previous.progress.fingerprint if previous.progress is not None else None
    check_resumable(stored, fingerprint, config.run_folder)
    progress = previous.progress
    if progress.epoch > config.epochs or (progress.epoch == config.epochs and progress.position > 0):
        raise FinetuneInputError(
            f"--epochs {config.epochs}, but the run in {config.run_folder} is already past epoch {config.epochs}; "
            f"raise --epochs to continue it, or pass --restart"
        )
    return progress


def _read_model_file(checkpoint) -> bytes:
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{MODEL_FILE}") as source:
        return source.read()


def _read_progress(checkpoint) -> RunProgress:
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{PROGRESS_FILE}") as source:
        return RunProgress.from_json(source.read().decode())


def export_hub_folder(model_file: bytes, destination: str, config: FinetuneConfig) -> None:
    """``OUTPUT/hub``: the weights in the Hugging Face layout (``transformers.DetrForObjectDetection``)."""
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/{MODEL_FILE}"
        with open(path, "wb") as f:
            f.write(model_file)
        model = detr.from_pretrained(path)
    detr.save_pretrained(model, destination, layout="hub", image_size=(config.min_size, config.max_size))


def write_outputs(
    config: FinetuneConfig,
    result: Any,
    train: TrainingSet,
    model: detr.DETR,
    fingerprint: dict,
    already_complete: bool = False,
) -> FinetuneResult:
    """``final.pth`` (the last epoch), ``best.pth`` (best validation AP among epoch ends, else the last),
    ``hub/`` (best.pth in the Hugging Face layout) and ``metrics.json`` from a finished run's checkpoints."""
    output = config.output.rstrip("/")
    progress = _read_progress(result.checkpoint)
    history = list(progress.history)
    epoch_ends = [(c, m) for c, m in result.best_checkpoints if "position" not in m]
    if config.val_annotations is not None and epoch_ends:
        best, best_metrics = max(epoch_ends, key=lambda entry: entry[1].get("val_AP", float("-inf")))
    else:
        best, best_metrics = result.checkpoint, history[-1] if history else {}
    final_bytes, best_bytes = _read_model_file(result.checkpoint), _read_model_file(best)
    write_bytes(f"{output}/final.pth", final_bytes)
    write_bytes(f"{output}/best.pth", best_bytes)
    export_hub_folder(best_bytes, f"{output}/hub", config)
    metrics = {
        "output": output,
        "final": f"{output}/final.pth",
        "best": f"{output}/best.pth",
        "best_epoch": best_metrics.get("epoch"),
        "hub": f"{output}/hub",
        "tensorboard": f"{output}/{TENSORBOARD}",
        "curves": f"{output}/{CURVES_PNG}",
        "checkpoints": config.run_folder,
        "already_complete": already_complete,
        "categories": categories_to_list(model.categories),
        "train_images": len(train.images),
        "train_boxes": train.num_boxes,
        "ignored_crowd_boxes": train.num_crowd,
        "dropped_empty_boxes": train.num_degenerate,
        "skipped_images": len(progress.skipped_images),
        "skipped": list(progress.skipped_images),
        "settings": dataclasses.asdict(config),
        "fingerprint": fingerprint_digest(fingerprint),
        "model_config": model.config.to_dict(),
        "epochs": history,
    }
    write_bytes(f"{output}/metrics.json", json.dumps(metrics, indent=1).encode())
    return FinetuneResult(metrics)


def main(config: FinetuneConfig) -> FinetuneResult:
    """Train, or resume; returns the summary also written to ``OUTPUT/metrics.json``."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    train = load_dataset(config.train_images, config.train_annotations)
    validation = load_dataset(config.val_images, config.val_annotations) if config.val_annotations else None
    if validation is not None and validation.categories != train.categories:
        raise FinetuneInputError(
            f"{config.val_annotations}: categories {[(c.id, c.name) for c in validation.categories]} differ from "
            f"{config.train_annotations}'s {[(c.id, c.name) for c in train.categories]}"
        )
    model = initial_model(config, train.categories)
    fingerprint = run_fingerprint(config, model.categories, model.config)
    if config.restart:
        start_over(config)
    resumed = resume_point(config, fingerprint)
    if resumed is not None and resumed.finished(config.epochs):
        print(f"the run in {config.run_folder} is already complete ({resumed.epoch} epochs); not training", flush=True)
        return write_outputs(config, _read_result(config.run_folder), train, model, fingerprint, already_complete=True)
    spec = TrainingSpec(config, model.config, model.categories, fingerprint)
    storage_path, run_name, filesystem = run_storage(config.run_folder)
    where = (
        f"resuming {config.run_folder} at epoch {resumed.epoch + 1}, step {resumed.step} "
        f"(sample {resumed.position} of the epoch)"
        if resumed is not None
        else f"checkpoints in {config.run_folder}"
    )
    print(
        f"fine-tuning {model.config.backbone} DETR ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"parameters) on {len(train.images)} images / {train.num_boxes} boxes / {len(train.categories)} classes "
        f"({train.num_crowd} crowd and {train.num_degenerate} empty boxes left out) with {config.workers} workers; "
        f"{where}",
        flush=True,
    )
    if not ray.is_initialized():
        ray.init()
    gpus = {"GPU": config.gpus_per_worker} if config.gpus_per_worker else {}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec, "initial_weights": ray.put(model.state_dict())},
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.workers,
            use_gpu=config.gpus_per_worker > 0,
            resources_per_worker={"CPU": config.cpus_per_worker, **gpus},
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            # Mid-epoch checkpoints report val_AP -inf: kept are the best epoch ends by AP, plus the latest.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.keep_checkpoints,
                checkpoint_score_attribute="val_AP" if validation is not None else None,
                checkpoint_score_order="max",
            ),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        raise TrainingFailedError(str(error)) from None
    outcome = result.return_value or {}
    if outcome.get("error"):
        raise TrainingFailedError(outcome["error"])
    return write_outputs(config, result, train, model, fingerprint)
