"""The pipeline's CPU stage: read a block of URIs, decode and resize each image for the model.

Every input row becomes exactly one row of :data:`PREPARED_SCHEMA`, whatever the object holds:
the resized pixels, or an ``error`` of one line, and never an exception out of the task
(``--fail-on-error`` aside). Reading is :func:`storage.iter_objects` (literal names, a size cap,
transient faults read again with backoff); decoding is :func:`detr.decode_resized` (only
:data:`detr.image_decoding.FORMATS`, EXIF upright, any mode to RGB, large JPEGs at reduced scale).

Errors a later run should try again (the store still throttling or failing after every attempt)
start with :data:`coco.detection_table.RETRYABLE_ERROR_PREFIX`; all others are final.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from coco.detection_table import RETRYABLE_ERROR_PREFIX
from detr.image_decoding import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_resized
from jobs.annotate.decoder_process import DecoderProcess, kill_if_test_hook_matches
from storage import ObjectTooLargeError, ReadPolicy, TransientReadError, iter_objects, one_line

# The CPU stage's output, one row per input URI; ``pixels`` holds the resized image as
# uint8 CHW bytes (empty on error), so blocks stay plain Arrow.
PREPARED_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string()),
        pa.field("width", pa.int32()),  # original (EXIF-upright) width; null on error
        pa.field("height", pa.int32()),
        pa.field("error", pa.string()),  # null on success
        pa.field("resized_height", pa.int32()),  # 0 on error
        pa.field("resized_width", pa.int32()),
        pa.field("pixels", pa.binary()),
    ]
)

# Decode tasks' niceness: the lowest. Ray starts every worker, the model actor's included, at
# nice 15 (its worker_niceness), so anything less would not rank decoding below the model.
DECODE_NICENESS = 19


@dataclass(frozen=True)
class DecodeSettings:
    """How an object's bytes become the model's input (see :func:`detr.decode_resized`)."""

    min_size: int
    max_size: int
    max_pixels: int = DEFAULT_MAX_PIXELS  # the decompression-bomb limit
    reduced_jpeg: bool = True  # decode large JPEGs at reduced scale


@dataclass(frozen=True)
class Decoded:
    """One decoded image: uint8 CHW ``pixels`` of ``resized`` (h, w); ``size`` is the upright
    (height, width) of the full image, in which boxes are reported."""

    pixels: bytes
    resized: tuple[int, int]
    size: tuple[int, int]


def decode_object(uri: str, data: bytes, settings: DecodeSettings) -> Decoded:
    """Decode and resize one object (in this process or a :class:`DecoderProcess`).

    Raises:
        ImageDecodeError: with a one-line reason, also for what the decoder did not foresee.
    """
    kill_if_test_hook_matches(uri)
    try:
        resized, size = decode_resized(  # uint8 (3, h, w)
            data,
            min_size=settings.min_size,
            max_size=settings.max_size,
            max_pixels=settings.max_pixels,
            reduced_jpeg=settings.reduced_jpeg,
        )
    except ImageDecodeError:
        raise
    except Exception as error:  # noqa: BLE001 - one object's surprise is that object's error row
        raise ImageDecodeError(f"cannot decode: {type(error).__name__}: {one_line(error)}") from None
    return Decoded(resized.contiguous().numpy().tobytes(), (resized.shape[1], resized.shape[2]), size)


def decode_block(batch: pa.Table, **settings) -> pa.Table:
    """The decode task Ray Data runs: :func:`prepare_images` at a priority below the model's,
    with the decoder isolated when Ray retries the task (its worker died, maybe of a decoder
    crash on one of these objects).

    It lives here, not beside the pipeline, so that a decode worker imports what decoding
    needs and not the model's code (the detector, torchvision: ~1 s of a core and ~170 MB
    per worker).
    """
    yield_to_the_model()
    return prepare_images(batch, isolate_decoder=task_attempt() > 0, **settings)


def yield_to_the_model() -> None:
    """Run this worker on the CPU time the model leaves. On Linux, in the idle scheduling class: it
    never preempts the model's threads and runs when a core would otherwise idle (between the
    model's operators, ~2% of the time on 2 cores), with a small share when none does; also
    nice DECODE_NICENESS, all there is elsewhere. Decoded images queue ahead of the model anyway."""
    if hasattr(os, "nice") and os.nice(0) < DECODE_NICENESS:
        os.nice(DECODE_NICENESS - os.nice(0))
    enter_idle_class()


def enter_idle_class() -> None:
    """This thread, and the threads it starts, into Linux's idle scheduling class (nothing
    elsewhere). An unprivileged thread cannot leave it again."""
    if hasattr(os, "SCHED_IDLE") and os.sched_getscheduler(0) != os.SCHED_IDLE:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def task_attempt() -> int:
    """0 for a task's first run, 1 for its first retry, ... (1 where Ray no longer says: isolating
    every block is slower but safe)."""
    import ray

    try:
        return ray._private.worker.global_worker.core_worker.get_current_task_attempt_number()
    except AttributeError:
        return 1


def read_failure_reason(error: Exception) -> str:
    """The row's ``error`` for an object that could not be read."""
    if isinstance(error, TransientReadError):
        return f"{RETRYABLE_ERROR_PREFIX}{error}"  # "retryable: HTTP 503 SlowDown after 3 attempts"
    if isinstance(error, ObjectTooLargeError):
        return f"too large: {error} (--max-object-bytes)"
    return f"unreadable: {one_line(error)}"


def prepare_images(
    batch: pa.Table,
    *,
    min_size: int,
    max_size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    fail_on_error: bool = False,
    reduced_jpeg: bool = True,
    read_policy: ReadPolicy = ReadPolicy(),
    isolate_decoder: bool = False,
) -> pa.Table:
    """The pipeline's CPU stage: read, decode and resize a batch of images.

    Args:
        batch: a table with a ``uri`` string column and optionally ``size`` (int64 bytes from the
            listing, null where unknown): an object known to exceed ``read_policy.max_bytes`` is
            not read at all.
        min_size, max_size: DETR's resize rule (see :func:`detr.resized_shape`).
        max_pixels: the decompression-bomb limit.
        fail_on_error: raise :class:`ImageDecodeError` naming the first bad object instead of
            returning an error row (``--fail-on-error``).
        reduced_jpeg: decode large JPEGs at reduced scale (see :func:`detr.decode_resized`).
        read_policy: size cap, attempts on transient faults and read concurrency.
        isolate_decoder: decode each object in a child process, so one that crashes or hangs
            the decoder becomes an error row (a retried block; see :mod:`jobs.annotate.decoder_process`).
    Returns:
        A table in :data:`PREPARED_SCHEMA`, one row per input row, in input order.
    """
    uris = batch.column("uri").to_pylist()
    sizes = batch.column("size").to_pylist() if "size" in batch.column_names else None
    settings = DecodeSettings(min_size, max_size, max_pixels, reduced_jpeg)
    columns: dict[str, list] = {name: [] for name in PREPARED_SCHEMA.names}
    with DecoderProcess(decode_object, settings) if isolate_decoder else _InProcess(settings) as decoder:
        for uri, content in zip(uris, iter_objects(uris, sizes, read_policy)):
            try:
                if isinstance(content, Exception):
                    raise ImageDecodeError(read_failure_reason(content))
                decoded: Decoded = decoder.decode(uri, content)
            except ImageDecodeError as error:
                if fail_on_error:
                    raise ImageDecodeError(f"{uri}: {error.reason}") from None
                row = (uri, None, None, error.reason, 0, 0, b"")
            else:
                height, width = decoded.size
                row = (uri, width, height, None, *decoded.resized, decoded.pixels)
            for name, value in zip(PREPARED_SCHEMA.names, row):
                columns[name].append(value)
    return pa.table(columns, schema=PREPARED_SCHEMA)


class _InProcess:
    """:class:`DecoderProcess`'s interface, decoding in this process."""

    def __init__(self, settings: DecodeSettings, decode: Callable[..., Decoded] = decode_object) -> None:
        self.settings, self._decode = settings, decode

    def decode(self, uri: str, data: bytes) -> Decoded:
        return self._decode(uri, data, self.settings)

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        pass
