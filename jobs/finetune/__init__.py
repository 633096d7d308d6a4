"""Fine-tune DETR on a COCO-format dataset with Ray Train (distributed data-parallel).

    python -m jobs.finetune --train-images s3://b/train/images --train-annotations s3://b/train.json \\
        --val-images s3://b/val/images --val-annotations s3://b/val.json --output s3://b/run1 \\
        --workers 4 --gpus-per-worker 1 --epochs 50

Modules: :mod:`.settings` (the command line and its config), :mod:`.data` (COCO images and
boxes as training samples), :mod:`.transforms` (DETR's augmentation), :mod:`.sampler` (the
resumable epoch permutation and per-sample augmentation seeds), :mod:`.engine` (one epoch, one
evaluation; no Ray), :mod:`.run_state` (what a checkpoint holds), :mod:`.fingerprint` (which
settings a resume must share), :mod:`.curves` (TensorBoard and curves.png), :mod:`.worker` (the
Ray Train worker: loaders, checkpoints, resume) and :mod:`.trainer` (the driver).
"""

from __future__ import annotations

from collections.abc import Sequence

from jobs import cli
from jobs.finetune.settings import FinetuneConfig, build_parser, config_from_args, parse_config

__all__ = ["FinetuneConfig", "build_parser", "config_from_args", "main", "parse_config", "run"]


def __getattr__(name: str) -> object:
    # The driver (Ray) is loaded on first use: the Ray-free modules (settings, engine, ...) import without Ray.
    if name == "main":
        from jobs.finetune.trainer import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run(argv: Sequence[str] | None = None) -> int:
    """``python -m jobs.finetune``: the exit status."""
    from jobs.finetune.trainer import main

    return cli.run("finetune", build_parser, config_from_args, main, argv)
