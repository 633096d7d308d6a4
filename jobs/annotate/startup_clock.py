"""When a run's first batch of detections was done: the start-up figure of the job's summary.

Each model actor reports the wall-clock time of its first batch, once; the first report to
arrive is kept in the cluster's key-value store (the GCS, through ``ray.experimental.internal_kv``,
as Ray's own libraries use it) under the run's id, and the driver reads it when the run is over.
It used to be a tiny actor: one more Ray process, and every Ray process wakes 100 times a second
and reports to the GCS, CPU taken from the model on a small machine (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

NAMESPACE = "detr-ray"


@dataclass(frozen=True)
class FirstBatchClock:
    """Made by the driver for one run and handed to the model actors as their ``on_first_batch``."""

    run_id: str

    @property
    def key(self) -> str:
        return f"annotate/{self.run_id}/first-batch"

    def __call__(self, wall_time: float) -> None:
        """An actor's first batch was done at ``wall_time`` (``time.time()``); kept if it is the first report."""
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(self.key, repr(wall_time), overwrite=False, namespace=NAMESPACE)

    def read(self) -> float | None:
        """The first report, taken out of the store; None if no actor finished a batch."""
        from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get

        value = _internal_kv_get(self.key, namespace=NAMESPACE)
        _internal_kv_del(self.key, namespace=NAMESPACE)
        return None if value is None else float(value)
