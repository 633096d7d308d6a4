"""Reading many objects, each one's bytes or the exception that says why not.

Names are literal: each object is one ``cat_file`` of its own path, never a list handed to
``fs.cat``, which expands ``[ ] * ?`` as glob patterns (``img[1].png`` would not be found and
``*.jpg`` would read every sibling). Async filesystems (s3fs, gcsfs, ...) read a window of
objects concurrently on fsspec's event loop; the next window is read while the caller works on
the current one.

Each read is capped: at most ``max_bytes + 1`` bytes are fetched (one ranged GET on S3), and an
object known (from its listing) or found to be larger becomes :class:`ObjectTooLargeError`
without being read whole. Transient faults (:func:`storage.faults.is_transient`) are read again
with exponential backoff, on top of the client's own retries (botocore and s3fs retry throttling
and dropped connections several times per read); when they persist the result is
:class:`TransientReadError`, which the caller can record as worth retrying on a later run.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import fsspec.asyn
from fsspec.implementations.local import LocalFileSystem

from .faults import fault_reason, is_range_not_satisfiable, is_transient

# No image we decode needs more: a 100-megapixel camera JPEG is ~30 MB. It bounds what one
# object can make a decode task hold (a block's objects are in memory at once).
DEFAULT_MAX_OBJECT_BYTES = 64 * 2**20


class ObjectTooLargeError(ValueError):
    """The object is larger than the read limit; ``size`` is None when only known to exceed it."""

    def __init__(self, size: int | None, limit: int) -> None:
        self.size, self.limit = size, limit
        super().__init__(f"{size} bytes > limit {limit}" if size is not None else f"more than {limit} bytes")


class TransientReadError(OSError):
    """A transient fault that outlasted every attempt; ``reason`` names it (``HTTP 503 SlowDown``)."""

    def __init__(self, reason: str, attempts: int) -> None:
        self.reason, self.attempts = reason, attempts
        super().__init__(f"{reason} after {attempts} attempts")


@dataclass(frozen=True)
class ReadPolicy:
    """How objects are read: size cap, attempts on transient faults, concurrency."""

    max_bytes: int = DEFAULT_MAX_OBJECT_BYTES  # larger objects are errors, never read whole
    # Reads per object while faults are transient: each already includes the client's retries
    # (s3fs/botocore: up to 25 requests over ~30 s for S3 throttling), so a few suffice.
    attempts: int = 3
    first_backoff_s: float = 1.0  # pause before the second read; doubles, jittered
    max_backoff_s: float = 10.0
    # Objects read at once: enough to hide an object store's ~20-50 ms first-byte latency behind
    # decoding, few enough that a window of large objects stays a small part of a task's memory.
    concurrency: int = 16

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.attempts < 1 or self.concurrency < 1:
            raise ValueError(f"need max_bytes, attempts and concurrency >= 1, got {self}")

    def backoff_s(self, attempt: int) -> float:
        """The pause after failed attempt ``attempt`` (1-based): between half and all of an
        exponential cap, so tasks that failed together do not retry together."""
        cap = min(self.max_backoff_s, self.first_backoff_s * 2 ** (attempt - 1))
        return random.uniform(cap / 2, cap)


def read_objects(
    uris: Sequence[str], sizes: Sequence[int | None] | None = None, policy: ReadPolicy = ReadPolicy()
) -> list[bytes | Exception]:
    """Every object's bytes or the exception reading it ended with, in order (see :func:`iter_objects`)."""
    return list(iter_objects(uris, sizes, policy))


def iter_objects(
    uris: Sequence[str], sizes: Sequence[int | None] | None = None, policy: ReadPolicy = ReadPolicy()
) -> Iterator[bytes | Exception]:
    """Yield each URI's bytes, or the exception that reading it ended with, in input order.

    Args:
        uris: object URIs, literal (no glob expansion).
        sizes: each object's size in bytes when the listing knows it (None where unknown);
            larger than ``policy.max_bytes`` gives :class:`ObjectTooLargeError` without a read.
        policy: size cap, attempts and concurrency.
    Yields:
        ``bytes`` or an exception: :class:`ObjectTooLargeError`, :class:`TransientReadError`
        (transient faults outlasted ``policy.attempts``), or the client's own error (missing
        object, access denied, an unusable URI, ...).
    """
    if sizes is not None and len(sizes) != len(uris):
        raise ValueError(f"need one size per URI, got {len(sizes)} sizes for {len(uris)} URIs")
    step = policy.concurrency
    windows = [range(start, min(start + step, len(uris))) for start in range(0, len(uris), step)]
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-objects")

    def read(window: range) -> Future:
        return reader.submit(_read_window, [uris[i] for i in window], _sizes(sizes, window), policy)

    try:
        pending = read(windows[0]) if windows else None
        for following in [*windows[1:], None]:
            results = pending.result()
            pending = read(following) if following is not None else None  # read on while the caller works
            yield from results
    finally:
        reader.shutdown(wait=False, cancel_futures=True)


def _sizes(sizes: Sequence[int | None] | None, window: range) -> list[int | None]:
    return [sizes[i] for i in window] if sizes is not None else [None] * len(window)


def _read_window(uris: list[str], sizes: list[int | None], policy: ReadPolicy) -> list[bytes | Exception]:
    """Read one window: objects on async filesystems concurrently on fsspec's loop, others in turn."""
    results: list[bytes | Exception] = [b""] * len(uris)
    on_loop: list[tuple[int, fsspec.asyn.AsyncFileSystem, str]] = []
    for index, (uri, size) in enumerate(zip(uris, sizes)):
        try:
            fs, path = fsspec.core.url_to_fs(uri)
        except Exception as error:  # noqa: BLE001 - an unusable URI is that object's error
            results[index] = error
            continue
        if size is not None and size > policy.max_bytes:
            results[index] = ObjectTooLargeError(size, policy.max_bytes)
        elif size == 0:
            results[index] = b""  # known empty: nothing to fetch (and S3 refuses a range of nothing)
        elif isinstance(fs, fsspec.asyn.AsyncFileSystem) and fs.async_impl:
            on_loop.append((index, fs, path))
        else:
            results[index] = _read_with_retries(fs, path, policy)
    by_loop: dict[int, list[tuple[int, fsspec.asyn.AsyncFileSystem, str]]] = {}
    for member in on_loop:  # one loop in practice: fsspec's shared IO loop
        by_loop.setdefault(id(member[1].loop), []).append(member)
    for members in by_loop.values():

        async def read_all(members=members) -> list[bytes | Exception]:
            return await asyncio.gather(*(_read_with_retries_async(fs, path, policy) for _, fs, path in members))

        for (index, _, _), content in zip(members, fsspec.asyn.sync(members[0][1].loop, read_all)):
            results[index] = content
    return results


def _read_with_retries(fs: fsspec.AbstractFileSystem, path: str, policy: ReadPolicy) -> bytes | Exception:
    read = _read_local if isinstance(fs, LocalFileSystem) else _read_range
    for attempt in range(1, policy.attempts + 1):
        try:
            return _capped(read(fs, path, policy.max_bytes), policy.max_bytes)
        except Exception as error:  # noqa: BLE001 - every failure becomes this object's result
            outcome = _after_failure(error, attempt, policy)
        if outcome is not None:
            return outcome
        time.sleep(policy.backoff_s(attempt))
    raise AssertionError("unreachable: the last attempt returns")


async def _read_with_retries_async(fs: fsspec.asyn.AsyncFileSystem, path: str, policy: ReadPolicy) -> bytes | Exception:
    for attempt in range(1, policy.attempts + 1):
        try:
            return _capped(await fs._cat_file(path, start=0, end=policy.max_bytes + 1), policy.max_bytes)
        except Exception as error:  # noqa: BLE001 - every failure becomes this object's result
            outcome = _after_failure(error, attempt, policy)
        if outcome is not None:
            return outcome
        await asyncio.sleep(policy.backoff_s(attempt))
    raise AssertionError("unreachable: the last attempt returns")


def _read_range(fs: fsspec.AbstractFileSystem, path: str, max_bytes: int) -> bytes:
    return fs.cat_file(path, start=0, end=max_bytes + 1)


def _read_local(fs: fsspec.AbstractFileSystem, path: str, max_bytes: int) -> bytes:
    """A local file, sized first: a read of ``max_bytes + 1`` would allocate that much (5x slower
    for a photo than the read itself)."""
    with open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        if size > max_bytes:
            raise ObjectTooLargeError(size, max_bytes)
        content = stream.read(size + 1)
        if len(content) > size:  # grew since fstat: read on, up to the cap
            content += stream.read(max_bytes + 1 - len(content))
        return content


def _capped(content: bytes, max_bytes: int) -> bytes | Exception:
    return ObjectTooLargeError(None, max_bytes) if len(content) > max_bytes else content


def _after_failure(error: Exception, attempt: int, policy: ReadPolicy) -> bytes | Exception | None:
    """The object's result after a failed attempt, or None to read it again."""
    if isinstance(error, ObjectTooLargeError):
        return error
    if is_range_not_satisfiable(error):
        return b""  # a range of an empty object: the decoder says "empty file"
    if not is_transient(error):
        return error
    if attempt == policy.attempts:
        return TransientReadError(fault_reason(error), attempt)
    return None
