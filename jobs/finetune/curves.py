"""Training curves as training goes: TensorBoard event files and ``curves.png`` in OUTPUT; no Ray here.

Rank 0 writes TensorBoard scalars (the training loss terms every ``--log-every-steps`` steps,
each epoch's metrics and validation AP, all against the global step) into a local folder and
copies its event files to ``OUTPUT/tensorboard/`` after every checkpoint, in a background thread,
so any storage works (``tensorboard --logdir s3://...`` or a local copy). A resumed run starts a
new event file that tells TensorBoard to drop the previous files' events from the resumed step
on (``purge_step``), so the curves do not double back. ``OUTPUT/curves.png`` (loss terms and
validation AP per epoch) is redrawn at the same moments.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from matplotlib.figure import Figure

from storage import one_line, write_bytes

TENSORBOARD = "tensorboard"
CURVES_PNG = "curves.png"
LOSS_TERMS = ("loss", "loss_ce", "loss_bbox", "loss_giou")
EPOCH_SCALARS = (*LOSS_TERMS, "lr", "images_per_second", "skipped_images", "val_AP", "val_AP50", "val_AP75")
logger = logging.getLogger(__name__)


def render_curves(history: Sequence[dict]) -> bytes:
    """PNG: loss terms per epoch (left) and validation AP / AP50 per epoch when there is a validation set (right)."""
    figure = Figure(figsize=(10, 4))
    losses, ap = figure.subplots(1, 2)
    epochs = [m["epoch"] + 1 for m in history]
    for term in LOSS_TERMS:
        losses.plot(epochs, [m[term] for m in history], marker="o", label=term)
    losses.set(title="training loss", xlabel="epoch", yscale="log")
    losses.legend()
    if any("val_AP" in m for m in history):
        for name in ("val_AP", "val_AP50"):
            ap.plot(epochs, [m.get(name, float("nan")) for m in history], marker="o", label=name[4:])
        ap.set(title="validation", xlabel="epoch", ylim=(0, 1))
        ap.legend()
    else:
        ap.set_axis_off()
        ap.text(0.5, 0.5, "no validation set", ha="center", va="center")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()


class TrainingCurves:
    """Rank 0's TensorBoard writer and ``curves.png``, published to ``output`` in a background thread.

    Args:
        output: the job's OUTPUT folder URI.
        purge_step: the global step training (re)starts from.
    """

    def __init__(self, output: str, purge_step: int) -> None:
        from tensorboardX import SummaryWriter  # imported here: only rank 0 writes curves

        self.output = output.rstrip("/")
        self.local = tempfile.mkdtemp(prefix="detr-ray-tensorboard-")
        self.writer = SummaryWriter(self.local, purge_step=purge_step)
        self.uploads = ThreadPoolExecutor(1, thread_name_prefix="curves")
        self.pending: Future | None = None

    def add_step(self, step: int, losses: dict[str, float]) -> None:
        for name, value in losses.items():
            self.writer.add_scalar(f"train/{name}", value, step)

    def add_epoch(self, metrics: dict) -> None:
        for name in EPOCH_SCALARS:
            if name in metrics:
                group = "val" if name.startswith("val_") else "epoch"
                self.writer.add_scalar(f"{group}/{name.removeprefix('val_')}", metrics[name], metrics["step"])

    def publish(self, history: Sequence[dict]) -> None:
        """Copy the event files and redraw ``curves.png`` without making training wait (at most one queued)."""
        self.writer.flush()
        if self.pending is not None and not self.pending.done():
            return  # the upload in flight is followed by the next checkpoint's
        self.pending = self.uploads.submit(self._upload, list(history))

    def close(self, history: Sequence[dict]) -> None:
        """Flush, publish the final state and wait for it."""
        self.writer.close()
        if self.pending is not None:
            self.pending.result()
        self.uploads.submit(self._upload, list(history)).result()
        self.uploads.shutdown()
        shutil.rmtree(self.local, ignore_errors=True)

    def _upload(self, history: list[dict]) -> None:
        # Failures are logged, not raised: curves must never cost the training they describe.
        try:
            for name in sorted(os.listdir(self.local)):
                with open(os.path.join(self.local, name), "rb") as events:
                    write_bytes(f"{self.output}/{TENSORBOARD}/{name}", events.read())
            if history:
                write_bytes(f"{self.output}/{CURVES_PNG}", render_curves(history))
        except Exception as error:  # noqa: BLE001 - any storage error, one line in the log
            logger.warning("could not publish training curves to %s: %s", self.output, one_line(error))
