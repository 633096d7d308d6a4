"""What a fine-tuning checkpoint holds, and how it is written and read; no Ray here.

A checkpoint directory has three files:

* ``model.pth``: :func:`detr.save_pretrained`'s layout (weights, config, class table), loadable by
  :func:`detr.from_pretrained` and ``jobs.annotate --weights``;
* ``training_state.pt``: optimizer, LR scheduler, grad scaler and every worker's torch RNG state
  (tensors and plain containers only, read back with ``weights_only``);
* ``progress.json``: where training stands (:class:`RunProgress`) - small, so the driver reads it
  to decide whether to resume before Ray Train starts.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from detr.checkpoint import read_state, save_pretrained, unwrap
from jobs.finetune.engine import EpochProgress

MODEL_FILE = "model.pth"
STATE_FILE = "training_state.pt"
PROGRESS_FILE = "progress.json"


@dataclass(frozen=True)
class RunProgress:
    """Where a run stands at a checkpoint.

    Args:
        fingerprint: the settings that change results (:func:`jobs.finetune.fingerprint.run_fingerprint`).
        epoch: the epoch in progress; with ``position`` 0, the number of epochs done.
        position: samples of that epoch's permutation already drawn (:class:`jobs.finetune.sampler.EpochSampler`).
        step: optimizer steps taken since the start of the run.
        epoch_sums, epoch_skipped: the epoch's partial sums (:class:`EpochProgress`).
        world_size: workers that wrote it (the RNG states are per worker).
        history: per-epoch metrics of the finished epochs.
        skipped_images: distinct unusable training images met so far, one ``"URI: reason"`` line each.
    """

    fingerprint: dict
    epoch: int = 0
    position: int = 0
    step: int = 0
    epoch_sums: tuple[float, ...] = EpochProgress().sums
    epoch_skipped: int = 0
    world_size: int = 1
    history: tuple[dict, ...] = ()
    skipped_images: tuple[str, ...] = ()

    @property
    def epoch_progress(self) -> EpochProgress:
        return EpochProgress(self.position, tuple(self.epoch_sums), self.epoch_skipped)

    def finished(self, epochs: int) -> bool:
        return self.position == 0 and self.epoch >= epochs

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> RunProgress:
        values = json.loads(text)
        for name in ("epoch_sums", "history", "skipped_images"):
            values[name] = tuple(values[name])
        return cls(**values)


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    rng_states: list[dict[str, Tensor]],
    progress: RunProgress,
) -> None:
    """Write the three files into ``folder`` (a local directory).

    Args:
        rng_states: per worker (index = rank), ``{"cpu": ByteTensor, "cuda": ByteTensor (on GPU)}``.
    """
    save_pretrained(unwrap(model), str(folder / MODEL_FILE))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng_states": rng_states,
        },
        folder / STATE_FILE,
    )
    (folder / PROGRESS_FILE).write_text(progress.to_json())


def load_checkpoint(folder: Path) -> tuple[dict[str, Tensor], dict, RunProgress]:
    """Model state dict, training state and progress of a checkpoint directory (no pickled code is run)."""
    model_state, _ = read_state(str(folder / MODEL_FILE))
    training_state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    return model_state, training_state, RunProgress.from_json((folder / PROGRESS_FILE).read_text())
