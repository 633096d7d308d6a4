"""What a run leaves in OUTPUT: Parquet files of one naming, what counts as done, and the summary.

Every run writes files named ``annotations-<run id>-<write uuid>_<task>.parquet`` in the schema of
:mod:`coco.detection_table`. A URI is done when it is in a complete file of that naming, so a
killed run started again skips it; files of other names are never read as done or deleted.
"""

from __future__ import annotations

import posixpath
import re
import sys
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.annotate.listing import ImageSourceError
from storage import filesystem_for, one_line

# Output files the annotate job writes: ``annotations-<run id>-<write uuid>_<task>.parquet``.
OUTPUT_FILE_PATTERN = re.compile(r"^annotations-[0-9A-Za-z]+-.*\.parquet$")


@dataclass(frozen=True)
class Summary:
    output: str
    run_id: str
    images: int  # rows written by this run
    errors: int
    detections: int
    skipped: int  # URIs already in OUTPUT before this run
    seconds: float
    startup_seconds: float | None = None  # from the job's start to its first annotated batch; None: none ran

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        startup = f"first image after {self.startup_seconds:.1f} s; " if self.startup_seconds is not None else ""
        return (
            f"annotate: {self.images} images ({self.images - self.errors} ok, {self.errors} errors), "
            f"{self.detections} detections, {self.images_per_second:.2f} img/s over {self.seconds:.1f} s; "
            f"{startup}{self.skipped} already in {self.output} were skipped"
        )


class RunFilenames:
    """Ray ``FilenameProvider``: ``annotations-<run id>-<write uuid>_<task>.parquet``, so each
    run's files are new names and the run's own files can be found for its summary."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"annotations-{self.run_id}-{write_uuid}_{task_index:06}.parquet"


def run_files(output: str, run_id: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The filesystem of OUTPUT and the paths of the files one run wrote there."""
    fs, root = filesystem_for(output)
    return fs, sorted(p for p in fs.find(root) if posixpath.basename(p).startswith(f"annotations-{run_id}-"))


def summarize(output: str, run_id: str, *, skipped: int, seconds: float) -> Summary:
    """Count this run's rows, errors and detections from its files, one file at a time."""
    fs, files = run_files(output, run_id)
    images = errors = detections = 0
    for path in files:
        with fs.open(path, "rb") as stream:
            table = pq.read_table(stream, columns=["error", "detections"])
        images += table.num_rows
        errors += table.num_rows - table.column("error").null_count
        detections += int(pc.sum(pc.list_value_length(table.column("detections"))).as_py() or 0)
    return Summary(output, run_id, images, errors, detections, skipped, seconds)


def completed_uris(output_uri: str) -> pa.Array | None:
    """The ``uri`` column of every complete Parquet file under OUTPUT (None if there is none).

    A file counts only when its footer reads: Ray's ``write_parquet`` writes each file in
    place, so a job killed mid-write can leave a truncated file on a local or mounted
    filesystem (object stores only show finished uploads). Truncated files this job wrote
    are deleted, so their images are annotated again; any other unreadable Parquet file is
    an error, as it would break every later reader of OUTPUT.
    """
    fs, root = filesystem_for(output_uri)
    if not fs.exists(root):
        return None
    if not fs.isdir(root):
        raise ImageSourceError(f"{output_uri}: exists and is not a folder")
    arrays = []
    for path in sorted(p for p in fs.find(root) if p.endswith(".parquet")):
        try:
            with fs.open(path, "rb") as stream:
                table = pq.read_table(stream, columns=["uri"])
        except (pa.ArrowInvalid, OSError, KeyError) as error:
            if not OUTPUT_FILE_PATTERN.match(posixpath.basename(path)):
                raise ImageSourceError(
                    f"{fs.unstrip_protocol(path)}: unreadable Parquet file in OUTPUT ({one_line(error)})"
                ) from None
            print(f"annotate: removing incomplete output file {fs.unstrip_protocol(path)}", file=sys.stderr)
            fs.rm(path)
            continue
        arrays.extend(table.column("uri").chunks)
    return pa.concat_arrays(arrays) if arrays else None
