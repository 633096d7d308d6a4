"""Which objects to annotate: a folder/prefix listed in parallel ranges, or a manifest read in parallel parts.

INPUT is either a folder / prefix URI (``s3://bucket/prefix``, ``gs://...``, ``file://...`` or a
local path), read recursively and filtered by file extension, or a manifest: a ``.txt`` file
with one URI per line, a ``.parquet`` file with a column of URIs, or an S3 Inventory (its
``manifest.json``, or one of its Parquet files: ``bucket``/``key``/``size`` columns).

:func:`plan_listing` cuts INPUT into :class:`ListingPart` s that Ray runs in parallel:

* a folder/prefix into key ranges (:func:`storage.split_ranges`). Each range is listed in key
  order and merged against the done index (:class:`~jobs.annotate.done_index.DoneCursor`) in
  constant memory, from the last done key onwards first (a resumed run reaches new work at
  once), then the part before it (objects added since);
* a manifest into row groups or byte ranges. Its entries are normalized (relative entries
  resolved against the manifest's folder, local paths made ``file://``, secrets in presigned
  URLs kept out of the ``uri``), then grouped into key ranges (:func:`range_of`) so that each
  range is de-duplicated and merged against the done index once (:func:`remaining_in_range`).

URIs are normalized once, here (``fs.unstrip_protocol``: ``s3://bucket/key``,
``file:///abs/path``), so the ``uri`` column of the output matches what a re-run lists.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import posixpath
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.annotate.done_index import DoneCursor, DoneIndex, Segment
from jobs.cli import UserError
from storage import (
    KeyRange,
    filesystem_for,
    folder_exists,
    is_local,
    iter_sorted,
    one_line,
    redact,
    split_ranges,
)

DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
MANIFEST_SUFFIXES = (".txt", ".parquet", "manifest.json")
LISTING_PAGE = 1000  # URIs per yielded table: S3's page size
FOLDER_RANGES = 32  # parallel listing streams for one prefix: ~3x10^5 keys/s on S3
# Below this many keys a prefix is one range: one stream lists it in about a second, while cutting it
# costs up to thousands of probe requests, and each range a task (a worker process to start).
SPLIT_MIN_KEYS = 10 * LISTING_PAGE
MANIFEST_PART_ROWS = 1 << 18  # manifest entries read by one task
TEXT_PART_BYTES = 32 << 20
LISTED_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string()),  # the object's identity, what the output's uri column holds
        pa.field("size", pa.int64()),  # bytes, null where the source does not say
        pa.field("source", pa.string()),  # where to read it when that differs (a presigned URL), else null
    ]
)


class ImageSourceError(UserError):
    """INPUT or OUTPUT cannot be used; the message names the URI and the reason."""


@dataclass(frozen=True)
class ListingPart:
    """One unit of listing work, run by one Ray task.

    Args:
        kind: ``folder`` (a key range of a folder/prefix), ``parquet`` or ``text`` (a manifest part).
        uri: the folder/prefix or manifest file.
        key_range: for ``folder``: the keys to list.
        row_groups: for ``parquet``: the row groups to read.
        byte_range: for ``text``: the lines starting in [start, end).
        column: for ``parquet``: the URI column (None for S3 Inventory's bucket/key).
        base: the folder relative manifest entries are resolved against.
    """

    kind: str
    uri: str
    key_range: KeyRange = KeyRange()
    row_groups: tuple[int, ...] = ()
    byte_range: tuple[int, int] = (0, 0)
    column: str | None = None
    base: str = ""


def is_manifest(uri: str) -> bool:
    return uri.rstrip("/").lower().endswith(MANIFEST_SUFFIXES)


def check_input(uri: str) -> None:
    """Raise :class:`ImageSourceError` unless ``uri`` is an existing manifest file or folder/prefix."""
    fs, path = filesystem_for(uri)
    shown = redact(uri)
    try:
        if is_manifest(uri):
            if not fs.isfile(path):
                raise ImageSourceError(f"{shown}: no such manifest file")
        elif not folder_exists(fs, path):
            if fs.isfile(path):
                raise ImageSourceError(f"{shown}: is a file, expected a folder, prefix or .txt/.parquet manifest")
            raise ImageSourceError(f"{shown}: no such folder or prefix")
    except (OSError, PermissionError) as error:
        raise ImageSourceError(f"{shown}: cannot be read ({one_line(error)})") from None


# --- planning (in the driver) ----------------------------------------------------------------


def plan_listing(uri: str, manifest_column: str = "uri") -> tuple[list[ListingPart], list[str]]:
    """The parts INPUT is read in, and for a manifest the URI boundaries of its key ranges
    (empty for a folder: its parts are key ranges already)."""
    if not is_manifest(uri):
        fs, root = filesystem_for(uri)
        return [ListingPart("folder", uri, r) for r in split_ranges(fs, root, FOLDER_RANGES, SPLIT_MIN_KEYS)], []
    if uri.lower().endswith("manifest.json"):
        files = _inventory_files(uri)
        return _plan_parquet(files, None), []
    if uri.lower().endswith(".parquet"):
        return _plan_parquet([uri], manifest_column), []
    return _plan_text(uri), []


def _plan_parquet(files: Sequence[str], column: str | None) -> list[ListingPart]:
    parts = []
    for uri in files:
        fs, path = filesystem_for(uri)
        with fs.open(path, "rb") as stream:
            manifest = pq.ParquetFile(stream)
            names = manifest.schema_arrow.names
            use = column if column in names else (None if {"bucket", "key"} <= set(names) else column)
            if use is not None and use not in names:
                raise ImageSourceError(f"{redact(uri)}: no column {use!r} (columns: {names})")
            group: list[int] = []
            rows = 0
            for number in range(manifest.metadata.num_row_groups):
                group.append(number)
                rows += manifest.metadata.row_group(number).num_rows
                if rows >= MANIFEST_PART_ROWS:
                    parts.append(ListingPart("parquet", uri, row_groups=tuple(group), column=use, base=_base(fs, path)))
                    group, rows = [], 0
            if group:
                parts.append(ListingPart("parquet", uri, row_groups=tuple(group), column=use, base=_base(fs, path)))
    return parts


def _plan_text(uri: str) -> list[ListingPart]:
    fs, path = filesystem_for(uri)
    size = fs.size(path)
    starts = list(range(0, max(size, 1), TEXT_PART_BYTES))
    base = _base(fs, path)
    return [ListingPart("text", uri, byte_range=(s, min(s + TEXT_PART_BYTES, size)), base=base) for s in starts]


def _inventory_files(uri: str) -> list[str]:
    """The Parquet data files an S3 Inventory ``manifest.json`` lists."""
    fs, path = filesystem_for(uri)
    try:
        document = json.loads(fs.cat_file(path))
        bucket = document["destinationBucket"].rsplit(":", 1)[-1]
        if document.get("fileFormat", "").lower() != "parquet":
            raise ImageSourceError(f"{redact(uri)}: S3 Inventory format {document.get('fileFormat')!r}; use Parquet")
        return [f"s3://{bucket}/{entry['key']}" for entry in document["files"]]
    except (ValueError, KeyError, TypeError) as error:
        raise ImageSourceError(f"{redact(uri)}: not an S3 Inventory manifest.json ({one_line(error)})") from None


def _base(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs.unstrip_protocol(posixpath.dirname(path))


def manifest_boundaries(parts: Sequence[ListingPart], ranges: int) -> list[str]:
    """``ranges - 1`` URIs that cut a manifest's entries into key ranges of similar size, from a
    sample: each part's first entries (one small read per part, in parallel)."""
    if ranges <= 1 or not parts:
        return []
    with ThreadPoolExecutor(16) as pool:
        samples = sorted({u for sample in pool.map(_sample, parts) for u in sample})
    if not samples:
        return []
    picks = np.linspace(0, len(samples), ranges + 1)[1:-1].astype(int)
    return sorted({samples[min(i, len(samples) - 1)] for i in picks})


def _sample(part: ListingPart, count: int = 64) -> list[str]:
    table = next(read_manifest_part(part, limit=count), None)
    return table.column("uri").to_pylist() if table is not None else []


# --- listing (in Ray tasks) ------------------------------------------------------------------


def list_folder_part(
    part: ListingPart, extensions: Sequence[str], index: DoneIndex | None, segments: Sequence[Segment]
) -> Iterator[pa.Table]:
    """The not-yet-done files of one key range with a listed extension, a page at a time.

    The range is listed from its last done key onwards first, then from its start up to that key.
    """
    fs, root = filesystem_for(part.uri)
    suffixes = tuple("." + e.lower().lstrip(".") for e in extensions)
    key_range = part.key_range
    resume = None
    if index is not None and segments:
        last = DoneCursor(index, segments).last_done_before(_absolute_key(fs, key_range.end))
        resume = _path_of(fs, last) if last is not None else None
    if resume is not None and resume in key_range and resume != key_range.start:
        pieces = [KeyRange(resume, key_range.end), KeyRange(key_range.start, resume)]
    else:
        pieces = [key_range]
    for piece in pieces:
        cursor = DoneCursor(index, segments) if index is not None else None
        for page in iter_sorted(fs, root, piece, LISTING_PAGE):
            page = [(fs.unstrip_protocol(path), size) for path, size in page if path.lower().endswith(suffixes)]
            yield _remaining(page, cursor)


def _absolute_key(fs: fsspec.AbstractFileSystem, path: str | None) -> str | None:
    return None if path is None else fs.unstrip_protocol(path)


def _path_of(fs: fsspec.AbstractFileSystem, uri: str) -> str:
    return fs._strip_protocol(uri)


def _remaining(page: list[tuple[str, int]], cursor: DoneCursor | None) -> pa.Table:
    uris = [u for u, _ in page]
    keep = ~cursor.contains(uris) if cursor is not None else np.ones(len(uris), bool)
    return pa.table(
        {
            "uri": pa.array([u for u, k in zip(uris, keep) if k], pa.string()),
            "size": pa.array([s for (_, s), k in zip(page, keep) if k], pa.int64()),
            "source": pa.nulls(int(keep.sum()), pa.string()),
        },
        schema=LISTED_SCHEMA,
    )


def read_manifest_part(part: ListingPart, limit: int | None = None) -> Iterator[pa.Table]:
    """A manifest part's entries, normalized, in :data:`LISTED_SCHEMA` (not yet de-duplicated)."""
    fs, path = filesystem_for(part.uri)
    if part.kind == "parquet":
        with fs.open(path, "rb") as stream:
            manifest = pq.ParquetFile(stream)
            columns = ["bucket", "key", *(["size"] if "size" in manifest.schema_arrow.names else [])]
            if part.column is not None:
                columns = [part.column, *(["size"] if "size" in manifest.schema_arrow.names else [])]
            for batch in manifest.iter_batches(LISTING_PAGE * 10, row_groups=list(part.row_groups), columns=columns):
                if part.column is None:  # S3 Inventory: bucket and key
                    entries = pc.binary_join_element_wise("s3://", batch.column("bucket"), "/", batch.column("key"), "")
                else:
                    entries = batch.column(part.column)
                sizes = batch.column("size") if "size" in batch.schema.names else None
                yield _normalized(fs, part.base, entries, sizes)
                if limit is not None:
                    return
        return
    start, end = part.byte_range
    with fs.open(path, "rb") as stream:
        if start > 0:  # lines starting before `start` belong to the previous part
            stream.seek(start - 1)
            stream.readline()
        lines: list[str] = []
        while stream.tell() < end:
            raw = stream.readline()
            if not raw:
                break
            entry = raw.decode("utf-8").strip()
            if entry and not entry.startswith("#"):
                lines.append(entry)
            if len(lines) >= (limit or LISTING_PAGE * 10):
                yield _normalized(fs, part.base, pa.array(lines, pa.string()), None)
                if limit is not None:
                    return
                lines = []
        if lines:
            yield _normalized(fs, part.base, pa.array(lines, pa.string()), None)


def _normalized(fs: fsspec.AbstractFileSystem, base: str, entries: pa.Array, sizes: pa.Array | None) -> pa.Table:
    """Manifest entries as absolute URIs; a presigned URL is read from ``source`` and named without its secret."""
    absolute, identity, source, kept_sizes = [], [], [], []
    sizes_list = sizes.to_pylist() if sizes is not None else [None] * len(entries)
    for entry, size in zip(entries.to_pylist(), sizes_list):
        if not entry or not entry.strip():
            continue
        uri = _absolute_uri(fs, base, entry.strip())
        absolute.append(uri)
        shown = redact(uri)
        identity.append(shown)
        source.append(uri if shown != uri else None)
        kept_sizes.append(size)
    return pa.table(
        {"uri": identity, "size": pa.array(kept_sizes, pa.int64()), "source": pa.array(source, pa.string())},
        schema=LISTED_SCHEMA,
    )


def _absolute_uri(fs: fsspec.AbstractFileSystem, base: str, entry: str) -> str:
    """Manifest entries: URIs as given; local paths made absolute ``file://``; relative entries
    resolved against the manifest's folder."""
    if "://" in entry:
        return entry
    if is_local(fs) and entry.startswith("/"):
        return fs.unstrip_protocol(entry)
    protocol, folder = base.split("://", 1) if "://" in base else ("file", base)
    return f"{protocol}://{posixpath.normpath(posixpath.join(folder, entry))}"


def range_of(uris: pa.Array, boundaries: Sequence[str]) -> pa.Array:
    """The key range (0..len(boundaries)) each URI falls in."""
    return pa.array([bisect.bisect_right(boundaries, u) for u in uris.to_pylist()], pa.int32())


def remaining_in_range(entries: pa.Table, index: DoneIndex | None, segments: Sequence[Segment]) -> pa.Table:
    """One key range of a manifest, sorted, each URI once, without the done ones."""
    order = pc.sort_indices(entries, sort_keys=[("uri", "ascending")])
    entries = entries.take(order)
    uris = entries.column("uri").to_pylist()
    first = np.ones(len(uris), bool)
    first[1:] = np.asarray(uris[1:], dtype=object) != np.asarray(uris[:-1], dtype=object)
    entries = entries.filter(pa.array(first))
    if index is None or not segments or not entries.num_rows:
        return entries.select(LISTED_SCHEMA.names)
    done = DoneCursor(index, segments).contains(entries.column("uri").to_pylist())
    return entries.filter(pa.array(~done)).select(LISTED_SCHEMA.names)


# --- as Ray tasks: one row per part, its fields as JSON (Ray Data blocks hold plain Arrow) ---


def part_row(part: ListingPart) -> dict[str, str]:
    return {"part": json.dumps(dataclasses.asdict(part))}


def _part_of(batch: pa.Table) -> ListingPart:
    values = json.loads(batch.column("part")[0].as_py())
    values["key_range"] = KeyRange(**values["key_range"])
    values["row_groups"] = tuple(values["row_groups"])
    values["byte_range"] = tuple(values["byte_range"])
    return ListingPart(**values)


def _index_of(output: str, segments: list[Segment]) -> DoneIndex | None:
    if not segments:
        return None
    fs, root = filesystem_for(output)
    return DoneIndex(fs, root)


def list_folder_task(batch: pa.Table, *, output: str, segments: list[Segment], extensions) -> Iterator[pa.Table]:
    """Ray ``map_batches`` function: one folder part (a JSON row of :func:`part_row`) -> its remaining URIs."""
    yield from list_folder_part(_part_of(batch), extensions, _index_of(output, segments), segments)


def read_manifest_task(batch: pa.Table, *, boundaries: list[str]) -> Iterator[pa.Table]:
    """Ray ``map_batches`` function: one manifest part -> its entries, each with the key range it falls in."""
    for table in read_manifest_part(_part_of(batch)):
        yield table.append_column("range", range_of(table.column("uri"), boundaries))


def remaining_in_range_task(group: pa.Table, *, output: str, segments: list[Segment]) -> pa.Table:
    """Ray ``map_groups`` function: one key range of a manifest -> each URI once, minus the done ones."""
    return remaining_in_range(group.drop_columns(["range"]), _index_of(output, segments), segments)


__all__ = [
    "DEFAULT_EXTENSIONS",
    "LISTED_SCHEMA",
    "ImageSourceError",
    "ListingPart",
    "check_input",
    "is_manifest",
    "list_folder_part",
    "list_folder_task",
    "manifest_boundaries",
    "plan_listing",
    "range_of",
    "part_row",
    "read_manifest_part",
    "read_manifest_task",
    "remaining_in_range",
    "remaining_in_range_task",
]
