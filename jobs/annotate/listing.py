"""Which objects to annotate: a folder/prefix listed lazily, or a manifest of URIs.

INPUT is either a folder / prefix URI (``s3://bucket/prefix``, ``gs://...``, ``file://...`` or a
local path), read recursively and filtered by file extension, or a manifest: a ``.txt`` file
with one URI per line or a ``.parquet`` file with a column of URIs.

Listing is lazy: :func:`iter_image_uris` yields one URI at a time while holding one listing
page (S3: 1,000 keys) or one directory in memory, and it runs inside a single Ray task
(:func:`list_image_uris`) that hands pages to the pipeline as it goes. We chose this over
Ray Data's ``read_binary_files``, whose file-based datasource expands every path (with
sizes) on the driver before the first read task starts: at millions of objects that is
gigabytes of driver memory and minutes before the first image. One paged listing stream
lists about 10^4 keys/s on S3, two orders of magnitude above what the model actors
consume, so listing in parallel would buy nothing.

URIs are normalized once, here (``fs.unstrip_protocol``: ``s3://bucket/key``,
``file:///abs/path``), so the ``uri`` column of the output matches what a re-run lists and
resuming (:func:`jobs.annotate.output.completed_uris`) is a plain set difference.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator, Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from jobs.annotate.settings import DEFAULT_EXTENSIONS
from jobs.cli import UserError
from storage import filesystem_for, one_line

MANIFEST_SUFFIXES = (".txt", ".parquet")
LISTING_PAGE = 1000  # URIs per yielded table: S3's page size


class ImageSourceError(UserError):
    """INPUT or OUTPUT cannot be used; the message names the URI and the reason."""


def is_manifest(uri: str) -> bool:
    return uri.rstrip("/").lower().endswith(MANIFEST_SUFFIXES)


def check_input(uri: str) -> None:
    """Raise :class:`ImageSourceError` unless ``uri`` is an existing manifest file or folder/prefix."""
    fs, path = filesystem_for(uri)
    try:
        if is_manifest(uri):
            if not fs.isfile(path):
                raise ImageSourceError(f"{uri}: no such manifest file")
        elif not fs.isdir(path):
            if fs.isfile(path):
                raise ImageSourceError(f"{uri}: is a file, expected a folder, prefix or .txt/.parquet manifest")
            raise ImageSourceError(f"{uri}: no such folder or prefix")
    except (OSError, PermissionError) as error:
        raise ImageSourceError(f"{uri}: cannot be read ({one_line(error)})") from None


def iter_image_uris(
    uri: str, extensions: Sequence[str] = DEFAULT_EXTENSIONS, manifest_column: str = "uri"
) -> Iterator[str]:
    """Every image URI under a folder/prefix (recursive, extension-filtered, lazily listed) or in a manifest."""
    if is_manifest(uri):
        yield from _iter_manifest(uri, manifest_column)
        return
    suffixes = tuple("." + e.lower().lstrip(".") for e in extensions)
    fs, root = filesystem_for(uri)
    for path in _iter_files(fs, root.rstrip("/")):
        if path.lower().endswith(suffixes):
            yield fs.unstrip_protocol(path)


def _iter_files(fs: fsspec.AbstractFileSystem, root: str) -> Iterator[str]:
    if type(fs).__name__ == "S3FileSystem" and hasattr(fs, "_iterdir"):
        yield from _iter_s3_keys(fs, root)
        return
    for directory, _, files in fs.walk(root):
        for name in sorted(files):
            yield posixpath.join(directory, name)
        if not isinstance(fs, LocalFileSystem):
            fs.invalidate_cache(directory)  # the listings cache would otherwise grow to the whole tree


def _iter_s3_keys(fs, root: str) -> Iterator[str]:
    """One flat (no delimiter) ListObjectsV2 stream, pulled one page at a time; s3fs's public
    ``find``/``walk`` would first collect the whole listing in memory."""
    bucket, key, _ = fs.split_path(root)
    pages = fs._iterdir(bucket, delimiter="", prefix=f"{key}/" if key else "")

    async def next_page() -> list[str]:
        names = []
        async for info in pages:
            if info["type"] == "file" and not info["name"].endswith("/"):
                names.append(info["name"])
            if len(names) >= 1000:
                break
        return names

    try:
        while names := fsspec.asyn.sync(fs.loop, next_page):
            yield from names
    finally:
        fsspec.asyn.sync(fs.loop, pages.aclose)


def _iter_manifest(uri: str, column: str) -> Iterator[str]:
    fs, path = filesystem_for(uri)
    parent = posixpath.dirname(path)
    if path.lower().endswith(".parquet"):
        with fs.open(path, "rb") as stream:
            manifest = pq.ParquetFile(stream)
            if column not in manifest.schema_arrow.names:
                raise ImageSourceError(f"{uri}: no column {column!r} (columns: {manifest.schema_arrow.names})")
            for batch in manifest.iter_batches(columns=[column], batch_size=10_000):
                for entry in batch.column(0).to_pylist():
                    if entry:
                        yield _absolute_uri(fs, parent, entry.strip())
        return
    with fs.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            entry = line.strip()
            if entry and not entry.startswith("#"):
                yield _absolute_uri(fs, parent, entry)


def _absolute_uri(fs: fsspec.AbstractFileSystem, parent: str, entry: str) -> str:
    """Manifest entries: URIs as given; local paths made absolute ``file://``; relative entries
    resolved against the manifest's folder."""
    if "://" in entry:
        return entry
    if isinstance(fs, LocalFileSystem) and entry.startswith("/"):
        return fs.unstrip_protocol(entry)
    return fs.unstrip_protocol(posixpath.normpath(posixpath.join(parent, entry)))


def list_image_uris(
    batch: pa.Table, *, extensions: Sequence[str], manifest_column: str, done: frozenset[str] = frozenset()
) -> Iterator[pa.Table]:
    """``map_batches`` generator: the image URIs of every INPUT in ``batch["input"]`` not in ``done``.

    Args:
        batch: a table with an ``input`` column of folder/prefix or manifest URIs (one, in practice).
        extensions: file extensions to keep when listing a folder/prefix.
        manifest_column: the URI column of a Parquet manifest.
        done: URIs already in OUTPUT (one hash set for the whole listing: pyarrow's ``is_in`` would
            rebuild one per page).
    Yields:
        tables with a ``uri`` column, about one listing page each, as the listing proceeds.
    """
    for source in batch.column("input").to_pylist():
        page: list[str] = []
        for uri in iter_image_uris(source, extensions, manifest_column):
            if uri not in done:
                page.append(uri)
            if len(page) == LISTING_PAGE:
                yield pa.table({"uri": pa.array(page, pa.string())})
                page = []
        if page:
            yield pa.table({"uri": pa.array(page, pa.string())})
