"""Listing every object under a folder or prefix in key order, in ranges that list in parallel.

Keys come out in ascending order of their path (S3's own order: UTF-8 bytes, which Python's
``str`` order matches), one page at a time, so a caller can merge the listing against another
sorted stream (the annotate job's index of what is done) in constant memory. Names are literal:
nothing here expands ``[ ] * ?`` the way fsspec's glob-aware calls do. Only files are listed; a
"folder" named ``x.jpg/`` (an S3 directory marker or a local directory) is not an object.

:func:`split_ranges` cuts a prefix into :class:`KeyRange` pieces that together cover every key
exactly once: on S3 by probing which next characters of the key exist (a listing stream runs at
~10^4 keys/s, a few dozen in parallel outpace any GPU pool), elsewhere by top-level folders.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import fsspec.asyn

S3_PAGE = 1000  # keys per ListObjectsV2 page: S3's maximum
# The next characters tried when cutting an S3 prefix: printable ASCII, what nearly all keys use.
# Keys starting with anything else still belong to a range (ranges cover the whole key space).
_PROBE_ALPHABET = [chr(c) for c in range(0x20, 0x7F)]
_MAX_PROBES = 4096  # ListObjectsV2 calls spent finding where to cut (64 at a time: ~a second on S3)
_PROBE_CONCURRENCY = 64


@dataclass(frozen=True)
class KeyRange:
    """Keys ``k`` with ``start <= k < end``, as the filesystem names them (``bucket/key``, ``/abs/path``);
    None is unbounded."""

    start: str | None = None
    end: str | None = None

    def __contains__(self, key: str) -> bool:
        return (self.start is None or key >= self.start) and (self.end is None or key < self.end)


def is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    return type(fs).__name__ == "S3FileSystem"


def iter_sorted(
    fs: fsspec.AbstractFileSystem, root: str, key_range: KeyRange = KeyRange(), page: int = S3_PAGE
) -> Iterator[list[tuple[str, int]]]:
    """Pages of ``(path, size)`` of every file under folder/prefix ``root`` within ``key_range``,
    ascending by path; at most ``page`` entries per page, one page held at a time."""
    entries = _iter_s3(fs, root, key_range) if is_s3(fs) else _walk_sorted(fs, root.rstrip("/"), key_range)
    batch: list[tuple[str, int]] = []
    for entry in entries:
        batch.append(entry)
        if len(batch) == page:
            yield batch
            batch = []
    if batch:
        yield batch


def folder_exists(fs: fsspec.AbstractFileSystem, root: str) -> bool:
    """Whether folder/prefix ``root`` exists; on S3 one ListObjectsV2 call of one key (s3fs's ``isdir``
    lists the whole prefix first: hours and gigabytes at 10^8 keys)."""
    if not is_s3(fs):
        return fs.isdir(root)
    bucket, prefix = _s3_prefix(fs, root)
    try:
        response = fsspec.asyn.sync(fs.loop, fs._call_s3, "list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except FileNotFoundError:  # no such bucket
        return False
    return bool(response.get("KeyCount") or response.get("Contents"))


def split_ranges(fs: fsspec.AbstractFileSystem, root: str, parts: int, min_keys: int = 0) -> list[KeyRange]:
    """About ``parts`` ranges (never fewer than one) that cover every key under ``root`` exactly once.

    Args:
        min_keys: a prefix holding fewer keys is one range, found by listing at most that many
            (``min_keys / 1000`` requests on S3): one stream lists it faster than probing cuts it.
    """
    if parts <= 1 or (min_keys > 0 and _holds_fewer(fs, root, min_keys)):
        return [KeyRange()]
    starts = _s3_boundaries(fs, root, parts) if is_s3(fs) else _tree_boundaries(fs, root.rstrip("/"), parts)
    bounds = [None, *sorted(set(starts)), None]
    return [KeyRange(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if lo is None or hi is None or lo < hi]


def _holds_fewer(fs: fsspec.AbstractFileSystem, root: str, keys: int) -> bool:
    listed = 0
    for page in iter_sorted(fs, root, page=min(keys, S3_PAGE)):
        listed += len(page)
        if listed >= keys:
            return False
    return True


def _sort_key(entry: dict) -> str:
    # A folder's files sort as "folder/...": after "folder.jpg" ('.' < '/'), before "folder0".
    return entry["name"] + "/" if entry["type"] == "directory" else entry["name"]


def _walk_sorted(fs: fsspec.AbstractFileSystem, folder: str, key_range: KeyRange) -> Iterator[tuple[str, int]]:
    for entry in sorted(fs.ls(folder, detail=True), key=_sort_key):
        name = entry["name"].rstrip("/")
        if entry["type"] == "directory":
            inside = KeyRange(name + "/", name + "0")  # every path below the folder
            if key_range.end is not None and inside.start >= key_range.end:
                break
            if key_range.start is None or inside.end > key_range.start:
                yield from _walk_sorted(fs, name, key_range)
        elif entry["type"] == "file":
            if key_range.end is not None and name >= key_range.end:
                break
            if name in key_range:
                yield name, int(entry.get("size") or 0)


def _tree_boundaries(fs: fsspec.AbstractFileSystem, root: str, parts: int) -> list[str]:
    entries = sorted(fs.ls(root, detail=True), key=_sort_key)
    while len(entries) == 1 and entries[0]["type"] == "directory":  # one folder holding everything: look inside
        entries = sorted(fs.ls(entries[0]["name"], detail=True), key=_sort_key)
    step = max(1, len(entries) // parts)
    return [entries[i]["name"].rstrip("/") for i in range(step, len(entries), step)]


def _s3_prefix(fs: fsspec.AbstractFileSystem, root: str) -> tuple[str, str]:
    bucket, key, _ = fs.split_path(root)
    key = key.strip("/")
    return bucket, f"{key}/" if key else ""


def _iter_s3(fs: fsspec.AbstractFileSystem, root: str, key_range: KeyRange) -> Iterator[tuple[str, int]]:
    """One ListObjectsV2 stream (no delimiter), a page at a time, from the range's start to its end."""
    bucket, prefix = _s3_prefix(fs, root)
    request = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": S3_PAGE}
    if key_range.start is not None:
        request["StartAfter"] = _before(key_range.start.split("/", 1)[1])
    while True:
        response = fsspec.asyn.sync(fs.loop, fs._call_s3, "list_objects_v2", **request)
        for item in response.get("Contents", []):
            path = f"{bucket}/{item['Key']}"
            if key_range.end is not None and path >= key_range.end:
                return
            if not item["Key"].endswith("/") and path in key_range:  # "x.jpg/" is a folder marker
                yield path, int(item.get("Size") or 0)
        if not response.get("IsTruncated"):
            return
        request = {**request, "ContinuationToken": response["NextContinuationToken"]}
        request.pop("StartAfter", None)


def _before(key: str) -> str:
    """A key S3 may start after so that ``key`` itself is listed (StartAfter is exclusive)."""
    return key[:-1] + chr(ord(key[-1]) - 1) if key and ord(key[-1]) > 0 else ""


def _s3_boundaries(fs: fsspec.AbstractFileSystem, root: str, parts: int) -> list[str]:
    """Paths where ranges start: the key prefixes a few characters past ``root`` that hold at least
    one key, found by listing each candidate with MaxKeys=1 (concurrently), one character deeper
    at a time until there are enough of them (a shared prefix such as zero padding costs a level
    of 95 probes and no range)."""
    bucket, prefix = _s3_prefix(fs, root)

    async def occupied(candidates: list[str]) -> list[str]:
        gate = asyncio.Semaphore(_PROBE_CONCURRENCY)

        async def probe(candidate: str) -> bool:
            async with gate:
                response = await fs._call_s3("list_objects_v2", Bucket=bucket, Prefix=candidate, MaxKeys=1)
            return bool(response.get("KeyCount") or response.get("Contents"))

        found = await asyncio.gather(*(probe(c) for c in candidates))
        return [c for c, hit in zip(candidates, found) if hit]

    frontier, probes = [prefix], 0
    while len(frontier) < parts and probes + len(frontier) * len(_PROBE_ALPHABET) <= _MAX_PROBES:
        deeper = fsspec.asyn.sync(fs.loop, occupied, [p + c for p in frontier for c in _PROBE_ALPHABET])
        probes += len(frontier) * len(_PROBE_ALPHABET)
        if not deeper:
            break
        frontier = deeper
    step = max(1, len(frontier) // parts)
    return [f"{bucket}/{frontier[i]}" for i in range(step, len(frontier), step)]


def iter_folder(fs: fsspec.AbstractFileSystem, folder: str, prefix: str = "") -> Iterator[list[tuple[str, int]]]:
    """Pages of ``(path, size)`` of the files directly in ``folder`` whose names start with ``prefix``,
    ascending (not recursive: on S3 one delimited listing, so a large sibling folder costs nothing)."""
    folder = folder.rstrip("/")
    if not is_s3(fs):
        entries = fs.ls(folder, detail=True)
        found = sorted(
            (e["name"], int(e.get("size") or 0))
            for e in entries
            if e["type"] == "file" and e["name"].rsplit("/", 1)[-1].startswith(prefix)
        )
        for start in range(0, len(found), S3_PAGE):
            yield found[start : start + S3_PAGE]
        return
    bucket, key_prefix = _s3_prefix(fs, folder)
    request = {"Bucket": bucket, "Prefix": key_prefix + prefix, "Delimiter": "/", "MaxKeys": S3_PAGE}
    while True:
        response = fsspec.asyn.sync(fs.loop, fs._call_s3, "list_objects_v2", **request)
        page = [(f"{bucket}/{item['Key']}", int(item.get("Size") or 0)) for item in response.get("Contents", [])]
        if page:
            yield page
        if not response.get("IsTruncated"):
            return
        request = {**request, "ContinuationToken": response["NextContinuationToken"]}
