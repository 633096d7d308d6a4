"""The finetune job's driver: checks the inputs, builds the starting model and runs Ray Train.

Every worker trains on its shard of the images; rank 0 checkpoints after each epoch under
``--checkpoint-dir`` (default ``OUTPUT/checkpoints``), and a failed worker restarts the run from
the last checkpoint (``--max-failures``); starting the job again with the same checkpoint dir
resumes it too. At the end ``OUTPUT/final.pth`` (last epoch), ``OUTPUT/best.pth`` (best validation
AP, else the last epoch) and ``OUTPUT/metrics.json`` are written; the weights load with
``detr.from_pretrained`` and carry the dataset's class names (``jobs.annotate --weights``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

import detr
from detr.categories import Category, categories_to_list
from jobs.cli import JobFailedError
from jobs.finetune.data import TrainingSet, read_training_set
from jobs.finetune.settings import FinetuneConfig, FinetuneInputError
from jobs.finetune.worker import MODEL_FILE, TrainingSpec, train_loop_per_worker
from storage import arrow_filesystem, filesystem_for, is_local, write_bytes


class TrainingFailedError(JobFailedError):
    """The run diverged or its workers failed more often than ``--max-failures`` allows."""

    headline = "training failed"


@dataclass(frozen=True)
class FinetuneResult:
    """What ``OUTPUT/metrics.json`` holds, and the line printed at the end."""

    metrics: dict

    def summary(self) -> str:
        m = self.metrics
        return f"wrote {m['final']}, {m['best']} (epoch {m['best_epoch']}) and {m['output']}/metrics.json"


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


def _copy_model_file(checkpoint, destination: str) -> None:
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{MODEL_FILE}") as source:
        write_bytes(destination, source.read())


def main(config: FinetuneConfig) -> FinetuneResult:
    """Train; returns the summary also written to ``OUTPUT/metrics.json``."""
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
    spec = TrainingSpec(config, model.config, model.categories)
    output = config.output.rstrip("/")
    storage_path, run_name, filesystem = run_storage(config.run_folder)
    print(
        f"fine-tuning {model.config.backbone} DETR ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"parameters) on {len(train.images)} images / {train.num_boxes} boxes / {len(train.categories)} classes "
        f"({train.num_crowd} crowd and {train.num_degenerate} empty boxes left out) with {config.workers} workers",
        flush=True,
    )
    if not ray.is_initialized():
        ray.init()
    score = "val_AP" if validation is not None else None
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
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.keep_checkpoints,
                checkpoint_score_attribute=score,
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
    history = outcome.get("history") or []
    best = (result.get_best_checkpoint(score, "max") if score else None) or result.checkpoint
    _copy_model_file(result.checkpoint, f"{output}/final.pth")
    _copy_model_file(best, f"{output}/best.pth")
    if score and history:
        best_epoch = max(history, key=lambda m: m[score])["epoch"]
    else:
        best_epoch = history[-1]["epoch"] if history else None
    metrics = {
        "output": output,
        "final": f"{output}/final.pth",
        "best": f"{output}/best.pth",
        "best_epoch": best_epoch,
        "checkpoints": result.path,
        "categories": categories_to_list(model.categories),
        "train_images": len(train.images),
        "train_boxes": train.num_boxes,
        "ignored_crowd_boxes": train.num_crowd,
        "dropped_empty_boxes": train.num_degenerate,
        "settings": dataclasses.asdict(config),
        "model_config": model.config.to_dict(),
        "epochs": history,
    }
    write_bytes(f"{output}/metrics.json", json.dumps(metrics, indent=1).encode())
    return FinetuneResult(metrics)
