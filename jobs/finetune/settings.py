"""The finetune job's settings: one frozen dataclass, the only source of defaults, and its parser."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import detr
from detr.config import BACKBONES
from jobs.cli import HelpFormatter, UserError
from jobs.finetune.transforms import AUGMENTATIONS

SCRATCH = ("none", "scratch")
# Architecture flags -> DetrConfig fields; with pretrained weights only num_queries and dropout may differ.
ARCHITECTURE = {
    "backbone": "backbone",
    "hidden_dim": "hidden_dim",
    "num_heads": "num_heads",
    "enc_layers": "num_encoder_layers",
    "dec_layers": "num_decoder_layers",
    "ffn_dim": "dim_feedforward",
    "num_queries": "num_queries",
    "dropout": "dropout",
}


class FinetuneInputError(UserError):
    """A bad flag value or input file; printed as one line, exit status 2."""


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run. Optimization defaults are the DETR paper's."""

    train_images: str  # folder URI the training annotations' file names are relative to
    train_annotations: str  # COCO instances JSON URI
    output: str  # folder URI for final.pth, best.pth, hub/, metrics.json, curves.png and tensorboard/
    val_images: str | None = None
    val_annotations: str | None = None
    checkpoint_dir: str | None = None  # Ray Train run folder; None: OUTPUT/checkpoints
    weights: str = "detr-r50"  # starting weights, or "scratch" for random init
    # Architecture (random init only, but num_queries/dropout); None keeps the weights' or DetrConfig's.
    backbone: str | None = None
    hidden_dim: int | None = None
    num_heads: int | None = None
    enc_layers: int | None = None
    dec_layers: int | None = None
    ffn_dim: int | None = None
    num_queries: int | None = None
    dropout: float | None = None
    freeze_backbone: bool = False
    epochs: int = 300
    batch_size: int = 2  # images per worker and step
    lr: float = 1e-4  # transformer and heads
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1  # 0 disables clipping
    lr_drop: int = 200  # epochs between 10x learning-rate drops
    loss: detr.LossConfig = detr.LossConfig()
    precision: str = "fp32"  # one of detr.PRECISIONS (autocast dtype)
    seed: int = 42  # random init, sampling and augmentation
    min_size: int = detr.MIN_SIZE  # evaluation shortest side; training scales are DETR's x min_size/800
    max_size: int = detr.MAX_SIZE
    augmentation: str = "detr"  # one of transforms.AUGMENTATIONS
    workers: int = 1  # Ray Train workers (data-parallel ranks)
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    loader_workers: int = 2  # DataLoader processes per worker
    max_failures: int = 3  # worker failures to recover from (-1: unlimited)
    keep_checkpoints: int = 2  # the best epoch by val AP is kept besides these, and the latest always
    # Mid-epoch checkpoints (besides the one after every epoch), whichever comes first; 0 turns either off.
    checkpoint_every_steps: int = 0
    checkpoint_every_minutes: float = 10.0  # a lost node costs at most this much training (plus the restart)
    max_bad_fraction: float = 0.01  # unusable training images tolerated per epoch before the run stops
    log_every_steps: int = 20  # TensorBoard scalars of the training loss
    restart: bool = False  # delete the run's checkpoints and outputs and start over

    def __post_init__(self) -> None:
        positive = (
            "epochs",
            "batch_size",
            "lr",
            "workers",
            "min_size",
            "max_size",
            "lr_drop",
            "keep_checkpoints",
            "log_every_steps",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise FinetuneInputError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in (
            "lr_backbone",
            "weight_decay",
            "clip_max_norm",
            "gpus_per_worker",
            "loader_workers",
            "cpus_per_worker",
            "checkpoint_every_steps",
            "checkpoint_every_minutes",
        ):
            if getattr(self, name) < 0:
                raise FinetuneInputError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if (self.val_images is None) != (self.val_annotations is None):
            raise FinetuneInputError("--val-images and --val-annotations go together; got only one of them")
        if self.precision not in detr.PRECISIONS:
            raise FinetuneInputError(f"--precision must be one of {detr.PRECISIONS}, got {self.precision!r}")
        if self.precision == "fp16" and self.gpus_per_worker == 0:
            raise FinetuneInputError("--precision fp16 needs --gpus-per-worker > 0 (use bf16 or fp32 on CPU)")
        if self.min_size > self.max_size:
            raise FinetuneInputError(f"--min-size {self.min_size} exceeds --max-size {self.max_size}")
        if self.augmentation not in AUGMENTATIONS:
            raise FinetuneInputError(f"--augmentation must be one of {AUGMENTATIONS}, got {self.augmentation!r}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise FinetuneInputError(f"--max-bad-fraction must lie in [0, 1], got {self.max_bad_fraction}")

    @property
    def from_scratch(self) -> bool:
        return self.weights.lower() in SCRATCH

    @property
    def architecture_overrides(self) -> dict:
        """The architecture flags given, as DetrConfig fields."""
        return {field: getattr(self, flag) for flag, field in ARCHITECTURE.items() if getattr(self, flag) is not None}

    @property
    def run_folder(self) -> str:
        return self.checkpoint_dir or f"{self.output.rstrip('/')}/checkpoints"


def build_parser() -> argparse.ArgumentParser:
    """The job's command line (also read by the cluster manifests' tests)."""
    d, loss = FinetuneConfig, detr.LossConfig
    p = argparse.ArgumentParser(
        prog="python -m jobs.finetune",
        description="Fine-tune DETR on a COCO-format dataset with Ray Train (distributed data-parallel).",
        formatter_class=HelpFormatter,
    )
    data = p.add_argument_group("data")
    data.add_argument("--train-images", required=True, help="folder URI of the training images")
    data.add_argument("--train-annotations", required=True, help="COCO instances JSON URI of the training images")
    data.add_argument("--val-images", help="folder URI of the validation images (enables validation AP)")
    data.add_argument("--val-annotations", help="COCO instances JSON URI of the validation images")
    data.add_argument(
        "--output",
        required=True,
        help="output folder URI: final.pth, best.pth, hub/ (transformers layout), metrics.json, curves.png, "
        "tensorboard/",
    )
    data.add_argument(
        "--checkpoint-dir", help="Ray Train run folder URI for the checkpoints (default OUTPUT/checkpoints)"
    )
    model = p.add_argument_group("model")
    model.add_argument(
        "--weights",
        default=d.weights,
        help="starting weights: a short name, hf://..., a path/URI, or 'scratch'/'none' for random init",
    )
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
    opt.add_argument("--epochs", type=int, default=d.epochs, help="training epochs")
    opt.add_argument("--batch-size", type=int, default=d.batch_size, help="images per worker and step")
    opt.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate of the transformer and heads")
    opt.add_argument("--lr-backbone", type=float, default=d.lr_backbone, help="AdamW learning rate of the backbone")
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    opt.add_argument("--clip-max-norm", type=float, default=d.clip_max_norm, help="gradient clipping max norm (0: off)")
    opt.add_argument("--lr-drop", type=int, default=d.lr_drop, help="epochs between 10x learning-rate drops")
    opt.add_argument("--eos-coef", type=float, default=loss.eos_coef, help="relative class weight of 'no object'")
    for name in ("ce", "bbox", "giou"):
        opt.add_argument(
            f"--loss-{name}", type=float, default=getattr(loss, f"loss_{name}"), help=f"weight of loss_{name}"
        )
    for name in ("class", "bbox", "giou"):
        opt.add_argument(
            f"--cost-{name}",
            type=float,
            default=getattr(loss, f"cost_{name}"),
            help=f"matching cost weight of the {name} term",
        )
    opt.add_argument(
        "--precision",
        choices=detr.PRECISIONS,
        default=d.precision,
        help="autocast dtype (fp16 needs a GPU; auto: bf16 on GPU, fp32 on CPU)",
    )
    opt.add_argument("--seed", type=int, default=d.seed, help="seed of random init, sampling and augmentation")
    scale = p.add_argument_group("image scales")
    scale.add_argument(
        "--min-size",
        type=int,
        default=d.min_size,
        help="evaluation shortest side; training scales are DETR's multiplied by min-size/800",
    )
    scale.add_argument("--max-size", type=int, default=d.max_size, help="longest side limit")
    scale.add_argument(
        "--augmentation",
        choices=AUGMENTATIONS,
        default=d.augmentation,
        help="detr: flip + multi-scale or resize-crop; scale: flip + multi-scale; none: fixed resize",
    )
    run = p.add_argument_group("cluster")
    run.add_argument("--workers", type=int, default=d.workers, help="Ray Train workers (data-parallel ranks)")
    run.add_argument(
        "--gpus-per-worker", type=float, default=d.gpus_per_worker, help="GPUs per worker (0: train on CPU)"
    )
    run.add_argument("--cpus-per-worker", type=float, default=d.cpus_per_worker, help="CPUs reserved per worker")
    run.add_argument("--loader-workers", type=int, default=d.loader_workers, help="DataLoader processes per worker")
    run.add_argument(
        "--max-failures", type=int, default=d.max_failures, help="worker failures to recover from (-1: unlimited)"
    )
    run.add_argument(
        "--keep-checkpoints",
        type=int,
        default=d.keep_checkpoints,
        help="checkpoints kept (best by val AP, plus the latest)",
    )
    resume = p.add_argument_group(
        "checkpoints and resume",
        "A checkpoint is written after every epoch and, within an epoch, every N steps or M minutes; the upload "
        "runs in the background. Starting the job again with the same --output (or --checkpoint-dir) resumes at "
        "the sample where the latest checkpoint was taken, if the settings that change results are the same "
        "(else it stops and names the flag); a finished run is not trained again.",
    )
    resume.add_argument(
        "--checkpoint-every-steps",
        type=int,
        default=d.checkpoint_every_steps,
        help="mid-epoch checkpoint every N optimizer steps (0: off)",
    )
    resume.add_argument(
        "--checkpoint-every-minutes",
        type=float,
        default=d.checkpoint_every_minutes,
        help="mid-epoch checkpoint every M minutes of training (0: off)",
    )
    resume.add_argument(
        "--restart",
        action="store_true",
        help="delete the run's checkpoints and outputs under OUTPUT and train from the start",
    )
    resume.add_argument(
        "--max-bad-fraction",
        type=float,
        default=d.max_bad_fraction,
        help="unusable training images (unreadable, corrupt, wrong size) are skipped and counted; more than "
        "this fraction of the training set in one epoch stops the run",
    )
    resume.add_argument(
        "--log-every-steps", type=int, default=d.log_every_steps, help="TensorBoard training-loss scalars every N steps"
    )
    return p


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The parsed command line as a :class:`FinetuneConfig` (raises :class:`FinetuneInputError`)."""
    values = vars(args).copy()
    try:
        loss = detr.LossConfig(
            eos_coef=values.pop("eos_coef"),
            **{f"loss_{n}": values.pop(f"loss_{n}") for n in ("ce", "bbox", "giou")},
            **{f"cost_{n}": values.pop(f"cost_{n}") for n in ("class", "bbox", "giou")},
        )
    except ValueError as error:
        raise FinetuneInputError(str(error)) from None
    return FinetuneConfig(**values, loss=loss)


def parse_config(argv: list[str] | None = None) -> FinetuneConfig:
    """``build_parser`` + :func:`config_from_args` (``sys.argv[1:]`` when ``argv`` is None)."""
    return config_from_args(build_parser().parse_args(argv))
