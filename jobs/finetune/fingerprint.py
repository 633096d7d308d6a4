"""What a checkpoint must share with the command line to be resumed: everything that changes results.

A run's fingerprint maps each such setting - the data URIs, the class table read from the
annotations, the model's architecture, every optimization and augmentation flag, the seed and
the number of workers (the global batch is ``--batch-size`` x ``--workers``) - to its value. It
is stored in every checkpoint; the driver compares it with the command line's before Ray Train
starts and names each flag that differs. Operational settings (where outputs go, how many
epochs, resources, DataLoader processes, failure and checkpoint policy) are left out: changing
them does not change what is learned, and raising ``--epochs`` extends a finished run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence

from detr import Category, DetrConfig
from jobs.finetune.settings import FinetuneConfig, FinetuneInputError

# FinetuneConfig fields that do not change the trained weights; every other field is fingerprinted.
OPERATIONAL = frozenset(
    {
        "output",
        "checkpoint_dir",
        "epochs",
        "gpus_per_worker",
        "cpus_per_worker",
        "loader_workers",
        "max_failures",
        "keep_checkpoints",
        "checkpoint_every_steps",
        "checkpoint_every_minutes",
        "max_bad_fraction",
        "log_every_steps",
        "restart",
    }
)
CLASSES = "classes (from --train-annotations)"
MODEL = "model architecture (from --weights and the architecture flags)"


class RunMismatchError(FinetuneInputError):
    """The checkpoints under the run folder come from a run with other settings."""


def flag(field: str) -> str:
    return f"--{field.replace('_', '-')}"


def run_fingerprint(config: FinetuneConfig, categories: Sequence[Category], model: DetrConfig) -> dict:
    """``{flag or derived setting: JSON value}`` of everything in ``config`` that changes results."""
    values: dict = {}
    for field in dataclasses.fields(config):
        if field.name in OPERATIONAL:
            continue
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):  # the loss weights: one flag per field (--loss-ce, --cost-class, ...)
            values.update({flag(f.name): getattr(value, f.name) for f in dataclasses.fields(value)})
        else:
            values[flag(field.name)] = value
    values[CLASSES] = [[c.id, c.name] for c in categories]
    values[MODEL] = model.to_dict()
    return json.loads(json.dumps(values))  # as it reads back from a checkpoint (tuples as lists)


def fingerprint_digest(fingerprint: Mapping) -> str:
    """A short hash of a fingerprint, for logs and metrics.json."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]


def differences(stored: Mapping, current: Mapping) -> list[str]:
    """``"--lr 0.0001 in the checkpoint, 0.0002 now"`` for each setting that differs."""
    lines = []
    for key in sorted(set(stored) | set(current)):
        old, new = stored.get(key, "(unset)"), current.get(key, "(unset)")
        if old != new:
            if isinstance(old, dict) and isinstance(new, dict):  # the architecture: name the fields
                old, new = _changed(old, new), _changed(new, old)
            lines.append(f"{key} {_show(old)} in the checkpoint, {_show(new)} now")
    return lines


def check_resumable(stored: Mapping | None, current: Mapping, run_folder: str) -> None:
    """Raise :class:`RunMismatchError` (one line) unless the checkpoint's fingerprint is ``current``."""
    if stored is None:
        raise RunMismatchError(
            f"{run_folder} holds checkpoints without a settings fingerprint (an older version wrote them); "
            f"pass --restart to start over, or use another --output"
        )
    found = differences(stored, current)
    if found:
        raise RunMismatchError(
            f"{run_folder} holds a run with other settings ({'; '.join(found)}); resume with the same settings, "
            f"pass --restart to start over, or use another --output"
        )


def _changed(values: Mapping, other: Mapping) -> dict:
    return {k: v for k, v in values.items() if other.get(k) != v}


def _show(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)
