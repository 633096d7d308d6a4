"""The detections table: the Parquet schema ``jobs.annotate`` writes and scoring and COCO export read.

One row per input object::

    uri         string    the object's URI (s3://bucket/key, file:///abs/path, ...)
    width       int32     image width in pixels after EXIF orientation; null on error
    height      int32     image height in pixels after EXIF orientation; null on error
    detections  list<struct<category_id: int32,  dataset category id (COCO ids for detr-r50)
                            label: string,       category name
                            score: float32,      class probability, best first
                            box: list<float32>>> [x_min, y_min, x_max, y_max] absolute pixels
                                                 of the upright image; empty on error
    error       string    null on success, else a one-line reason ("truncated JPEG", ...)
    model       string    the weights that produced the row ("detr-r50-e632da11.pth@1a2b3c4d")
"""

from __future__ import annotations

import posixpath

import fsspec
import pyarrow as pa

from storage import filesystem_for, folder_exists, redact

DETECTION_TYPE = pa.struct(
    [
        pa.field("category_id", pa.int32()),
        pa.field("label", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("box", pa.list_(pa.float32())),
    ]
)
DETECTIONS_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("detections", pa.list_(DETECTION_TYPE)),
        pa.field("error", pa.string()),
        pa.field("model", pa.string()),
    ]
)
# An error that may pass (throttling, timeouts, 5xx from the store): the next run retries rows
# whose error starts so; every other error row is final.
RETRYABLE_ERROR_PREFIX = "retryable: "
# What scoring and export read: the rest is for people and other tools.
SCORED_COLUMNS = ("uri", "detections", "error")
# Written by a run that finished; a folder of the job's files without it is being written or was killed.
COMPLETION_MARKER = "_SUCCESS.json"


def table_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """The Parquet files of a detections folder, sorted; like pyarrow's datasets, paths with a part
    starting with ``_`` or ``.`` (the job's ``_index/``, ``_lease/``) are not data."""
    root = root.rstrip("/")
    files = []
    for path in fs.find(root):
        inside = posixpath.relpath(path, root).split("/")
        if path.endswith(".parquet") and not any(part.startswith(("_", ".")) for part in inside):
            files.append(path)
    return sorted(files)


def incomplete_warning(uri: str) -> str | None:
    """One line to warn with when ``uri`` is a folder of the annotate job's files without the marker
    a finished run leaves (the run is still going, or was killed), else None."""
    fs, root = filesystem_for(uri)
    root = root.rstrip("/")
    if not folder_exists(fs, root) or fs.exists(f"{root}/{COMPLETION_MARKER}"):
        return None
    if not any(posixpath.basename(p).startswith("annotations-") for p in table_files(fs, root)):
        return None  # not the annotate job's output: nothing to say
    return (
        f"{redact(uri)} has no {COMPLETION_MARKER}: its annotate run is still going or was killed, so it may "
        "lack images (re-run annotate to finish; --allow-incomplete silences this)"
    )
