"""Fine-tune DETR on a COCO-format dataset with Ray Train (distributed data-parallel).

    python -m jobs.finetune --train-images s3://b/train/images --train-annotations s3://b/train.json \\
        --val-images s3://b/val/images --val-annotations s3://b/val.json --output s3://b/run1 \\
        --workers 4 --gpus-per-worker 1 --epochs 50

Every worker trains on its shard of the images; rank 0 checkpoints after each epoch under
``--checkpoint-dir`` (default ``OUTPUT/checkpoints``), and a failed worker restarts the run from
the last checkpoint (``--max-failures``); starting the job again with the same checkpoint dir
resumes it too. At the end ``OUTPUT/final.pth`` (last epoch), ``OUTPUT/best.pth`` (best validation
AP, else the last epoch) and ``OUTPUT/metrics.json`` are written; the weights load with
``detr.from_pretrained`` and carry the dataset's class names (``jobs.annotate --weights``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Sequence

import fsspec
import torch

import detr
from detr.categories import Category, categories_to_list
from detr.checkpoint import CheckpointError
from detr.config import BACKBONES
from detr.download import WeightsUnavailableError
from jobs.coco_dataset import CocoAnnotations, CocoFormatError, read_coco_annotations
from jobs.detection_transforms import AUGMENTATIONS, AugmentationConfig
from jobs.training_loop import MODEL_FILE, PRECISIONS, NonFiniteLossError, TrainSettings, train_loop_per_worker

SCRATCH = ("none", "scratch")
# Architecture flags -> DetrConfig fields; with pretrained weights only --num-queries and --dropout may differ.
ARCHITECTURE = {
    "backbone": "backbone", "hidden_dim": "hidden_dim", "num_heads": "num_heads", "enc_layers": "num_encoder_layers",
    "dec_layers": "num_decoder_layers", "ffn_dim": "dim_feedforward", "num_queries": "num_queries", "dropout": "dropout",
}


class FinetuneInputError(ValueError):
    """A bad flag value or input file; printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """The job's command line (also read by the cluster manifests' tests)."""
    p = argparse.ArgumentParser(prog="python -m jobs.finetune", description=__doc__.split("\n")[0])
    data = p.add_argument_group("data")
    data.add_argument("--train-images", required=True, help="folder URI of the training images")
    data.add_argument("--train-annotations", required=True, help="COCO instances JSON URI of the training images")
    data.add_argument("--val-images", help="folder URI of the validation images (enables validation AP)")
    data.add_argument("--val-annotations", help="COCO instances JSON URI of the validation images")
    data.add_argument("--output", required=True, help="output folder URI for final.pth, best.pth and metrics.json")
    data.add_argument("--checkpoint-dir", help="Ray Train run folder URI for per-epoch checkpoints (default OUTPUT/checkpoints)")
    model = p.add_argument_group("model")
    model.add_argument("--weights", default="detr-r50",
                       help="starting weights: a short name, hf://..., a path/URI, or 'scratch'/'none' for random init")
    model.add_argument("--backbone", choices=BACKBONES, help="ResNet trunk (random init only)")
    model.add_argument("--hidden-dim", type=int, help="transformer width (random init only)")
    model.add_argument("--num-heads", type=int, help="attention heads (random init only)")
    model.add_argument("--enc-layers", type=int, help="encoder layers (random init only)")
    model.add_argument("--dec-layers", type=int, help="decoder layers (random init only)")
    model.add_argument("--ffn-dim", type=int, help="feed-forward width (random init only)")
    model.add_argument("--num-queries", type=int, help="object queries; a new count re-initializes the query embedding")
    model.add_argument("--dropout", type=float, help="transformer dropout (default: the weights' / 0.1)")
    model.add_argument("--freeze-backbone", action="store_true", help="train only the transformer and heads")
    opt = p.add_argument_group("optimization (defaults: the DETR paper's)")
    opt.add_argument("--epochs", type=int, default=300, help="training epochs")
    opt.add_argument("--batch-size", type=int, default=2, help="images per worker and step")
    opt.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the transformer and heads")
    opt.add_argument("--lr-backbone", type=float, default=1e-5, help="AdamW learning rate of the backbone")
    opt.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    opt.add_argument("--clip-max-norm", type=float, default=0.1, help="gradient clipping max norm (0: off)")
    opt.add_argument("--lr-drop", type=int, default=200, help="epochs between 10x learning-rate drops")
    opt.add_argument("--eos-coef", type=float, default=0.1, help="relative class weight of 'no object'")
    for name, default in (("ce", 1.0), ("bbox", 5.0), ("giou", 2.0)):
        opt.add_argument(f"--loss-{name}", type=float, default=default, help=f"weight of loss_{name}")
    for name, default in (("class", 1.0), ("bbox", 5.0), ("giou", 2.0)):
        opt.add_argument(f"--cost-{name}", type=float, default=default, help=f"matching cost weight of the {name} term")
    opt.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32", help="autocast dtype (fp16 needs a GPU)")
    opt.add_argument("--seed", type=int, default=42, help="seed of random init, sampling and augmentation")
    scale = p.add_argument_group("image scales")
    scale.add_argument("--min-size", type=int, default=800,
                       help="evaluation shortest side; training scales are DETR's multiplied by min-size/800")
    scale.add_argument("--max-size", type=int, default=1333, help="longest side limit")
    scale.add_argument("--augmentation", choices=AUGMENTATIONS, default="detr",
                       help="detr: flip + multi-scale or resize-crop; scale: flip + multi-scale; none: fixed resize")
    run = p.add_argument_group("cluster")
    run.add_argument("--workers", type=int, default=1, help="Ray Train workers (data-parallel ranks)")
    run.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (0: train on CPU)")
    run.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker")
    run.add_argument("--loader-workers", type=int, default=2, help="DataLoader processes per worker")
    run.add_argument("--max-failures", type=int, default=3, help="worker failures to recover from (-1: unlimited)")
    run.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept (best by val AP, plus the latest)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``sys.argv[1:]`` when ``argv`` is None)."""
    return build_parser().parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Raise FinetuneInputError naming the first bad value."""
    positive = ("epochs", "batch_size", "lr", "workers", "min_size", "max_size", "lr_drop", "eos_coef", "keep_checkpoints")
    for name in positive:
        if getattr(args, name) <= 0:
            raise FinetuneInputError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("lr_backbone", "weight_decay", "clip_max_norm", "gpus_per_worker", "loader_workers", "cpus_per_worker"):
        if getattr(args, name) < 0:
            raise FinetuneInputError(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    if (args.val_images is None) != (args.val_annotations is None):
        raise FinetuneInputError("--val-images and --val-annotations go together; got only one of them")
    if args.precision == "fp16" and args.gpus_per_worker == 0:
        raise FinetuneInputError("--precision fp16 needs --gpus-per-worker > 0 (use bf16 or fp32 on CPU)")
    if args.min_size > args.max_size:
        raise FinetuneInputError(f"--min-size {args.min_size} exceeds --max-size {args.max_size}")


def load_dataset(images: str, annotations: str) -> CocoAnnotations:
    """Parse the annotations and check that the images folder holds the first image."""
    parsed = read_coco_annotations(annotations)
    if not parsed.images:
        raise FinetuneInputError(f"{annotations}: has no images")
    first = f"{images.rstrip('/')}/{parsed.images[0].file_name}"
    fs, path = fsspec.core.url_to_fs(first)
    if not fs.exists(path):
        raise FinetuneInputError(f"{first}: image listed in {annotations} not found under --train/val-images {images}")
    return parsed


def initial_model(args: argparse.Namespace, categories: Sequence[Category]) -> detr.DETR:
    """The starting DETR with a class head for ``categories``: random init or pretrained weights."""
    overrides = {field: getattr(args, flag) for flag, field in ARCHITECTURE.items() if getattr(args, flag) is not None}
    torch.manual_seed(args.seed)
    if args.weights.lower() in SCRATCH:
        config = detr.DetrConfig(**{**overrides, "num_classes": len(categories)})
        return detr.DETR(config, categories)
    fixed = sorted(f for f in overrides if f not in ("num_queries", "dropout"))
    if fixed:
        flags = [f"--{k.replace('_', '-')}" for k, v in ARCHITECTURE.items() if v in fixed]
        raise FinetuneInputError(f"{flags} only apply with --weights scratch; {args.weights!r} fixes the architecture")
    pretrained = detr.from_pretrained(args.weights, num_classes=len(categories), categories=categories)
    config = dataclasses.replace(pretrained.config, num_classes=len(categories), **overrides)
    model = detr.DETR(config, categories)
    state = pretrained.state_dict()
    if config.num_queries != pretrained.config.num_queries:  # new slots: keep everything but the query embedding
        state = {k: v for k, v in state.items() if not k.startswith("query_embed.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("query_embed.") for k in missing), (missing, unexpected)
    return model


def storage(uri: str) -> tuple[str, str, object | None]:
    """``(storage_path, run_name, pyarrow filesystem or None)`` for RunConfig from a folder URI.

    Remote URIs go through fsspec wrapped for pyarrow, so s3fs's settings (``AWS_ENDPOINT_URL`` for
    MinIO, Ceph, moto, ...) apply; pyarrow's own S3 client ignores that variable.
    """
    protocol, _ = fsspec.core.split_protocol(uri)
    if protocol in (None, "file", "local"):
        path = os.path.abspath(fsspec.core.strip_protocol(uri))
        return os.path.dirname(path), os.path.basename(path), None
    import pyarrow.fs

    fs, path = fsspec.core.url_to_fs(uri)
    path = path.rstrip("/")
    return os.path.dirname(path), os.path.basename(path), pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def settings_from_args(args: argparse.Namespace, model: detr.DETR) -> TrainSettings:
    augmentation = AugmentationConfig.scaled(args.min_size, args.max_size, args.augmentation)
    return TrainSettings(
        train_images=args.train_images, train_annotations=args.train_annotations,
        val_images=args.val_images, val_annotations=args.val_annotations,
        model_config=model.config.to_dict(), categories=categories_to_list(model.categories),
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lr_backbone=args.lr_backbone,
        weight_decay=args.weight_decay, clip_max_norm=args.clip_max_norm, lr_drop=args.lr_drop,
        eos_coef=args.eos_coef, precision=args.precision, freeze_backbone=args.freeze_backbone,
        loss_weights={"loss_ce": args.loss_ce, "loss_bbox": args.loss_bbox, "loss_giou": args.loss_giou},
        cost_weights={"cost_class": args.cost_class, "cost_bbox": args.cost_bbox, "cost_giou": args.cost_giou},
        augmentation=dataclasses.asdict(augmentation), loader_workers=args.loader_workers, seed=args.seed,
    )


def _copy_model_file(checkpoint, destination: str) -> None:
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{MODEL_FILE}") as source:
        data = source.read()
    with fsspec.open(destination, "wb") as f:
        f.write(data)


def main(args: argparse.Namespace) -> dict:
    """Train; returns the summary also written to ``OUTPUT/metrics.json``."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    check_args(args)
    train = load_dataset(args.train_images, args.train_annotations)
    validation = load_dataset(args.val_images, args.val_annotations) if args.val_annotations else None
    if validation is not None and validation.categories != train.categories:
        raise FinetuneInputError(
            f"{args.val_annotations}: categories {[(c.id, c.name) for c in validation.categories]} differ from "
            f"{args.train_annotations}'s {[(c.id, c.name) for c in train.categories]}"
        )
    try:
        model = initial_model(args, train.categories)
        settings = settings_from_args(args, model)
    except (CheckpointError, WeightsUnavailableError):
        raise
    except ValueError as error:  # DetrConfig / AugmentationConfig / weights name: the value is in the message
        raise FinetuneInputError(str(error)) from None
    output = args.output.rstrip("/")
    storage_path, run_name, filesystem = storage(args.checkpoint_dir or f"{output}/checkpoints")
    print(
        f"fine-tuning {model.config.backbone} DETR ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) "
        f"on {len(train.images)} images / {train.num_boxes} boxes / {len(train.categories)} classes "
        f"({train.num_crowd} crowd and {train.num_degenerate} empty boxes left out) with {args.workers} workers",
        flush=True,
    )
    if not ray.is_initialized():
        ray.init()
    score = "val_AP" if validation is not None else None
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"settings": dataclasses.asdict(settings), "initial_weights": ray.put(model.state_dict())},
        scaling_config=ray.train.ScalingConfig(
            num_workers=args.workers, use_gpu=args.gpus_per_worker > 0,
            resources_per_worker={"CPU": args.cpus_per_worker, **({"GPU": args.gpus_per_worker} if args.gpus_per_worker else {})},
        ),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=args.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=args.keep_checkpoints, checkpoint_score_attribute=score, checkpoint_score_order="max",
            ),
        ),
    )
    result = trainer.fit()
    outcome = result.return_value or {}
    if outcome.get("error"):
        raise NonFiniteLossError(outcome["error"])
    history = outcome.get("history") or []
    best = result.get_best_checkpoint(score, "max") if score else result.checkpoint
    best = best or result.checkpoint
    _copy_model_file(result.checkpoint, f"{output}/final.pth")
    _copy_model_file(best, f"{output}/best.pth")
    best_epoch = max(history, key=lambda m: m[score])["epoch"] if score and history else (history[-1]["epoch"] if history else None)
    summary = {
        "final": f"{output}/final.pth", "best": f"{output}/best.pth", "best_epoch": best_epoch,
        "checkpoints": result.path, "categories": categories_to_list(model.categories),
        "train_images": len(train.images), "train_boxes": train.num_boxes,
        "ignored_crowd_boxes": train.num_crowd, "dropped_empty_boxes": train.num_degenerate,
        "settings": dataclasses.asdict(settings), "epochs": history,
    }
    with fsspec.open(f"{output}/metrics.json", "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {output}/final.pth, {output}/best.pth (epoch {best_epoch}) and {output}/metrics.json", flush=True)
    return summary


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def run_cli(argv: Sequence[str] | None = None) -> int:
    """The command line: exit status 2 with one line for bad input, 1 when training fails."""
    import ray.train

    args = parse_args(argv)
    try:
        main(args)
    except (FinetuneInputError, CocoFormatError, CheckpointError, WeightsUnavailableError) as error:
        print(f"finetune: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, ray.train.TrainingFailedError) as error:
        print(f"finetune: training failed: {_one_line(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli())
