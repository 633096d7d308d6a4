"""The model stage of the annotate job: a callable class Ray Data runs in an actor pool.

Each actor loads the weights once (``__init__``), memory-mapped from the node's download cache,
and then turns whole batches of prepared
images (:data:`jobs.annotate.decoding.PREPARED_SCHEMA`) into rows of the detections table
(:data:`coco.DETECTIONS_SCHEMA`) under ``torch.inference_mode()`` (and autocast on GPU). Within a
batch, images of similar aspect ratio are run together so padded pixels - which DETR's
backbone computes on like real ones - stay a small share of the work.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

import detr
from coco import DETECTIONS_SCHEMA

# Largest share of a forward pass's pixels that may be padding before a batch is split by
# aspect ratio: landscape and portrait photos padded together waste ~40%, while one more
# (smaller) forward pass costs far less than that on GPU and nothing extra on CPU.
MAX_PADDING_FRACTION = 0.2
# How much a CPU actor may grow past its last heap trim before it trims again (see HeapTrimmer).
HEAP_SLACK_BYTES = 256 * 2**20
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class DetectorConfig:
    """What an actor needs; built from the job's checked :class:`~jobs.annotate.settings.AnnotateConfig`."""

    weights: str  # anything detr.from_pretrained accepts
    threshold: float = 0.7  # keep detections whose class probability is above this
    precision: str = "auto"  # one of detr.PRECISIONS
    use_gpu: bool = False  # run on the GPU Ray assigned to the actor
    cpu_threads: int | None = None  # torch intra-op threads (at most the cores); None keeps torch's default


class Detector:
    """``map_batches`` callable: prepared-image Arrow batch in, :data:`coco.DETECTIONS_SCHEMA` batch out.

    Args:
        config: what to load and how to run it.
        on_first_batch: called once, with the wall-clock time (``time.time()``) at which this
            actor's first batch was done: how the job learns its start-up time without a call
            per batch.
    """

    def __init__(self, config: DetectorConfig, on_first_batch: Callable[[float], None] | None = None) -> None:
        if config.use_gpu and not torch.cuda.is_available():
            raise RuntimeError("a GPU actor was requested but CUDA is not available in the actor")
        if config.cpu_threads is not None:
            # Ray sets OMP_NUM_THREADS to the actor's logical CPUs, which need not be its thread count;
            # a node declaring more logical CPUs than it has cores gets no more threads than cores.
            torch.set_num_threads(min(config.cpu_threads, _cores()))
        self.config = config
        self.device = torch.device("cuda" if config.use_gpu else "cpu")
        self.dtype = detr.autocast_dtype(config.precision, self.device)
        # All of the actor's torch work, loading included, runs on this one thread. Ray calls the
        # constructor and the batches from different threads, and OpenMP gives each thread that
        # starts parallel work a team of its own: with two teams libgomp manages more threads
        # than there are cores and stops spinning at barriers, so the model's second thread
        # sleeps and is woken at every operator (2 cores: 6% of the time idle, 3% fewer images
        # per second; benchmarks/RESULTS.md).
        self._torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="detr-model")
        self.model = self._torch_thread.submit(self._load).result()
        self.model_name = self.model.weights_name
        self.trim_heap = HeapTrimmer()
        self._on_first_batch = on_first_batch

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self._torch_thread.submit(self._annotate, batch).result()

    def _load(self) -> torch.nn.Module:
        # Already the fast model for inference: channels-last, frozen norms folded (benchmarks/RESULTS.md).
        return detr.from_pretrained(self.config.weights).to(self.device)

    def _annotate(self, batch: pa.Table) -> pa.Table:
        uris = batch.column("uri").to_pylist()
        errors = batch.column("error").to_pylist()
        widths = batch.column("width").to_pylist()
        heights = batch.column("height").to_pylist()
        detections: list[list[dict]] = [[] for _ in uris]
        ok = [i for i, error in enumerate(errors) if error is None]
        shapes = batch.select(["resized_height", "resized_width"]).to_pydict()
        pixels = batch.column("pixels")
        for group in aspect_groups([(shapes["resized_height"][i], shapes["resized_width"][i]) for i in ok]):
            indices = [ok[g] for g in group]
            images = [
                torch.from_numpy(
                    np.frombuffer(pixels[i].as_buffer(), np.uint8)
                    .reshape(3, shapes["resized_height"][i], shapes["resized_width"][i])
                    .copy()
                )
                for i in indices
            ]
            sizes = [(heights[i], widths[i]) for i in indices]
            for i, records in zip(indices, self.detect(images, sizes)):
                detections[i] = records
        if self.device.type == "cpu":  # on GPU the activations live in device memory
            self.trim_heap()
        annotated = pa.Table.from_pydict(
            {
                "uri": uris,
                "width": widths,
                "height": heights,
                "detections": detections,
                "error": errors,
                "model": [self.model_name] * len(uris),
            },
            schema=DETECTIONS_SCHEMA,
        )
        if self._on_first_batch is not None:
            self._on_first_batch(time.time())
            self._on_first_batch = None
        return annotated

    def detect(self, resized: Sequence[torch.Tensor], original_sizes: Sequence[tuple[int, int]]) -> list[list[dict]]:
        """Detections for one forward pass.

        Args:
            resized: uint8 Tensor[3, h, w] images already resized by ``detr.resize_image``.
            original_sizes: (height, width) of each image before resizing; boxes come back in
                these pixels (absolute xyxy).
        """
        batch = detr.collate(resized, original_sizes)
        pixel_values, pixel_mask = batch.pixel_values, batch.pixel_mask
        if self.device.type == "cuda":
            pixel_values, pixel_mask = pixel_values.pin_memory(), pixel_mask.pin_memory()
        with torch.inference_mode(), self._autocast():
            outputs = self.model(
                pixel_values.to(self.device, non_blocking=True), pixel_mask.to(self.device, non_blocking=True)
            )
            results = detr.postprocess(outputs, batch.original_sizes, self.config.threshold)
        return [detr.detection_records(result, self.model.categories) for result in results]

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def _cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class HeapTrimmer:
    """Hands the heap's free pages back to the OS (glibc only) whenever the process has grown by
    ``slack_bytes`` since the last time.

    CPU activations of ever-changing shapes (every aspect ratio) fragment glibc's heap, so an
    actor's memory would creep up with the batches it has seen; trimming after every batch costs
    throughput (the next batch faults the pages back in), so it trims only past an allowance
    (figures in benchmarks/RESULTS.md).
    """

    def __init__(
        self,
        slack_bytes: int = HEAP_SLACK_BYTES,
        resident_bytes: Callable[[], int] | None = None,
        trim: Callable[[], None] | None = None,
    ) -> None:
        self.slack_bytes = slack_bytes
        self._resident_bytes = resident_bytes or _resident_bytes
        self._trim = trim or _malloc_trim
        self._after_last_trim: int | None = None
        self.trims = 0

    def __call__(self) -> None:
        resident = self._resident_bytes()
        if self._after_last_trim is not None and resident - self._after_last_trim <= self.slack_bytes:
            return
        self._trim()
        self.trims += 1
        self._after_last_trim = self._resident_bytes()


def _resident_bytes() -> int:
    """This process's resident set size (Linux; 0 elsewhere, where nothing is trimmed anyway)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_BYTES
    except OSError:
        return 0


def _malloc_trim() -> None:
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def aspect_groups(shapes: Sequence[tuple[int, int]], max_padding: float = MAX_PADDING_FRACTION) -> list[list[int]]:
    """Split images into forward passes of similar aspect ratio.

    Args:
        shapes: (height, width) of each resized image.
        max_padding: the largest fraction of a group's padded batch that may be padding.
    Returns:
        Groups of indices into ``shapes``; every index appears once. Images are taken in order
        of aspect ratio and a group is closed when adding the next one would exceed
        ``max_padding``.
    """
    if not 0.0 <= max_padding < 1.0:
        raise ValueError(f"max_padding must be in [0, 1), got {max_padding}")
    order = sorted(range(len(shapes)), key=lambda i: shapes[i][0] / shapes[i][1])
    groups: list[list[int]] = []
    current: list[int] = []
    height = width = area = 0
    for i in order:
        h, w = shapes[i]
        new_height, new_width = max(height, h), max(width, w)
        padded = (len(current) + 1) * new_height * new_width
        if current and 1.0 - (area + h * w) / padded > max_padding:
            groups.append(current)
            current, height, width, area = [], 0, 0, 0
            new_height, new_width = h, w
        current.append(i)
        height, width, area = new_height, new_width, area + h * w
    if current:
        groups.append(current)
    return groups
