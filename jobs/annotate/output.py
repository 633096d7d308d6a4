"""What a run leaves in OUTPUT, what counts as done there, and who may write it.

The contract, for users and for resuming:

* every run writes files named ``annotations-<run id>-<write uuid>_<task>.parquet`` directly in
  OUTPUT, in the schema of :data:`coco.DETECTIONS_SCHEMA`;
* a URI is done when a readable file of that naming and schema holds a row for it whose error
  is not retryable (``coco.RETRYABLE_ERROR_PREFIX``): a re-run skips it, and retries the rest;
* files of other names or another schema are never read as done and never deleted; a file of
  our naming is deleted only when proven truncated (it lacks Parquet's closing magic bytes, as
  a write killed half-way leaves it on a local or mounted filesystem);
* ``_SUCCESS.json`` says the last run finished (counts, weights, arguments without secrets); a
  run removes it when it starts writing;
* ``_index/`` caches the done URIs sorted (:mod:`jobs.annotate.done_index`); it is checked
  against the files at every start and rebuilt from them when they disagree;
* ``_lease/`` holds the lease of the run writing OUTPUT: a second run is refused with one line
  while the lease is live; a killed run's lease expires (or is taken over at once on the same
  host once its process is gone).
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from coco import DETECTIONS_SCHEMA, RETRYABLE_ERROR_PREFIX
from coco.detection_table import COMPLETION_MARKER as MARKER
from jobs.annotate.done_index import CHUNK_ROWS, MAX_SEGMENTS, DoneIndex, Segment
from jobs.annotate.listing import ImageSourceError
from storage import create_exclusive, filesystem_for, folder_exists, is_local, iter_folder, one_line, replace_whole

FILE_PREFIX = "annotations-"
OUTPUT_FILE_PATTERN = re.compile(r"^annotations-(?P<run>[0-9A-Za-z]+)-.*\.parquet$")
LEASE_FOLDER = "_lease"
LEASE_SECONDS = 120.0  # a killed run blocks OUTPUT at most this long (on another host)
RENEW_SECONDS = 30.0
READ_THREADS = 16  # output files read at once when indexing (object-store latency, not CPU)
_PARQUET_MAGIC = b"PAR1"


class OutputInUseError(ImageSourceError):
    """Another live run holds OUTPUT's lease."""


@dataclass(frozen=True)
class Summary:
    output: str
    run_id: str
    images: int  # rows written by this run
    errors: int  # of which failed (retryable ones included)
    retryable: int  # of which the next run retries
    detections: int
    skipped: int  # URIs already done in OUTPUT that this run's listing passed over
    seconds: float
    startup_seconds: float | None = None  # from the job's start to its first annotated batch; None: none ran

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        retry = f", {self.retryable} to retry on the next run" if self.retryable else ""
        startup = f"first image after {self.startup_seconds:.1f} s; " if self.startup_seconds is not None else ""
        return (
            f"annotate: {self.images} images ({self.images - self.errors} ok, {self.errors} errors{retry}), "
            f"{self.detections} detections, {self.images_per_second:.2f} img/s over {self.seconds:.1f} s; "
            f"{startup}{self.skipped} already in {self.output} were skipped"
        )


class RunFilenames:
    """Ray ``FilenameProvider``: ``annotations-<run id>-<write uuid>_<task>.parquet``, so each
    run's files are new names and the run's own files can be found for its summary."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"{FILE_PREFIX}{self.run_id}-{write_uuid}_{task_index:06}.parquet"


class OutputFolder:
    """OUTPUT: its files, its done index, its lease and its completion marker."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, root = filesystem_for(uri)
        self.root = root.rstrip("/")
        self.index = DoneIndex(self.fs, self.root)

    def prepare(self) -> None:
        """Create OUTPUT if needed; refuse a file in its place."""
        if not folder_exists(self.fs, self.root) and self.fs.isfile(self.root):
            raise ImageSourceError(f"{self.uri}: exists and is not a folder")
        if is_local(self.fs):
            self.fs.makedirs(self.root, exist_ok=True)

    def files(self, run_id: str = "") -> Iterator[str]:
        """Paths of the files of our naming (of one run, if given), ascending by name."""
        if not self.fs.exists(self.root):
            return
        for page in iter_folder(self.fs, self.root, f"{FILE_PREFIX}{run_id}-" if run_id else FILE_PREFIX):
            for path, _ in page:
                if OUTPUT_FILE_PATTERN.match(os.path.basename(path)):
                    yield path

    # --- what counts as done -------------------------------------------------------------------

    def done_segments(self) -> list[Segment]:
        """The index, brought in line with the files: files not in it yet (a killed run's, a file
        copied in) become a new segment; if indexed files are gone, the index is rebuilt."""
        segments = self.index.segments()
        new, missing = _difference(self.files(), self.index.covered_files(segments))
        if missing:
            print(
                f"annotate: {len(missing)} indexed output file(s) are gone (e.g. {missing[0]}); "
                "rebuilding the done index from the files",
                file=sys.stderr,
            )
            retired, segments, new = segments, [], list(self.files())
        else:
            retired = []
        if new:
            segments = [*segments, self._segment_of(new)]
        if new or retired:
            self.index.commit(segments, retired)
        return segments

    def index_run(self, run_id: str, segments: list[Segment]) -> list[Segment]:
        """Add this run's files to the index and merge segments once there are too many."""
        files = list(self.files(run_id))
        if files:
            segments = [*segments, self._segment_of(files)]
        retired: list[Segment] = []
        if len(segments) > MAX_SEGMENTS:  # merge all but the largest: amortized, and at the end of a run
            largest = max(segments, key=lambda s: s.rows)
            retired = [s for s in segments if s is not largest]
            segments = [largest, self.index.merge(retired)]
        if files or retired:
            self.index.commit(segments, retired)
        return segments

    def _segment_of(self, paths: list[str]) -> Segment:
        """A segment of the done URIs of ``paths``; unreadable files are left out (and deleted
        when proven truncated), so they are looked at again at the next start."""
        used: list[str] = []  # filled while build() consumes done_uris(), read by it at the end

        def done_uris() -> Iterator[pa.Array]:
            start, size = 0, 1  # files read at once: sized from the last window's rows, so that a
            with ThreadPoolExecutor(READ_THREADS) as pool:  # window holds ~CHUNK_ROWS whatever the files hold
                while start < len(paths):
                    window = paths[start : start + size]
                    start, rows = start + len(window), 0
                    for path, uris in zip(window, pool.map(self._done_uris_of, window)):
                        if uris is not None:
                            used.append(os.path.basename(path))
                            rows += len(uris)
                            yield uris
                    size = max(1, min(READ_THREADS * 4, len(window) * CHUNK_ROWS // max(rows, 1)))

        return self.index.build(done_uris(), used)

    def _done_uris_of(self, path: str) -> pa.Array | None:
        try:
            with self.fs.open(path, "rb") as stream:
                parquet = pq.ParquetFile(stream)
                if not _has_our_schema(parquet.schema_arrow):
                    shown = self.fs.unstrip_protocol(path)
                    print(f"annotate: ignoring {shown}: not in the output schema", file=sys.stderr)
                    return None
                table = parquet.read(columns=["uri", "error"])
        except (pa.ArrowInvalid, OSError, KeyError) as error:
            self._unreadable(path, error)
            return None
        errors = table.column("error")
        retry = pc.fill_null(pc.starts_with(errors, RETRYABLE_ERROR_PREFIX), False)
        return table.column("uri").filter(pc.invert(retry)).combine_chunks()

    def _unreadable(self, path: str, error: BaseException) -> None:
        uri = self.fs.unstrip_protocol(path)
        if _truncated(self.fs, path):
            print(f"annotate: removing incomplete output file {uri}", file=sys.stderr)
            self.fs.rm(path)
        else:
            print(f"annotate: ignoring unreadable output file {uri} ({one_line(error)})", file=sys.stderr)

    # --- run bookkeeping -----------------------------------------------------------------------

    def clear_marker(self) -> None:
        if self.fs.exists(f"{self.root}/{MARKER}"):
            self.fs.rm(f"{self.root}/{MARKER}")

    def write_marker(self, summary: Summary, model: str, arguments: dict) -> None:
        document = {
            "run_id": summary.run_id,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "images": summary.images,
            "errors": summary.errors,
            "retryable_errors": summary.retryable,
            "detections": summary.detections,
            "skipped": summary.skipped,
            "seconds": round(summary.seconds, 3),
            "startup_seconds": None if summary.startup_seconds is None else round(summary.startup_seconds, 3),
            "model": model,
            "arguments": arguments,
        }
        self.fs.pipe_file(f"{self.root}/{MARKER}", (json.dumps(document, indent=1) + "\n").encode())

    def summarize(self, run_id: str, *, skipped: int, seconds: float) -> Summary:
        """Count this run's rows, errors and detections from its files, one file at a time."""
        images = errors = retryable = detections = 0
        for path in self.files(run_id):
            with self.fs.open(path, "rb") as stream:
                table = pq.read_table(stream, columns=["error", "detections"])
            images += table.num_rows
            errors += table.num_rows - table.column("error").null_count
            retry = pc.starts_with(table.column("error"), RETRYABLE_ERROR_PREFIX)
            retryable += int(pc.sum(pc.fill_null(retry, False)).as_py() or 0)
            detections += int(pc.sum(pc.list_value_length(table.column("detections"))).as_py() or 0)
        return Summary(self.uri, run_id, images, errors, retryable, detections, skipped, seconds)

    def lease(self, run_id: str) -> Lease:
        return Lease(self.fs, f"{self.root}/{LEASE_FOLDER}", self.uri, run_id)


class Lease:
    """The right to write OUTPUT, held by one run: ``_lease/<generation>.json`` with an expiry.

    Taking it creates the next generation's file exclusively, so of two runs racing for it one
    wins; the holder renews its file in a background thread. A live lease of another run refuses
    :meth:`acquire` with one line; an expired one, or one whose process is gone from this host, is
    taken over.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, folder: str, output_uri: str, run_id: str) -> None:
        self.fs, self.folder, self.output_uri, self.run_id = fs, folder, output_uri, run_id
        self.path: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        generation, holder = self._current()
        if holder is not None and _alive(holder):
            raise OutputInUseError(
                f"{self.output_uri} is being written by annotate run {holder['run_id']} (host {holder['host']}, "
                f"pid {holder['pid']}, lease until {_clock(holder['expires'])}); wait for it to finish, or "
                "point this run at another OUTPUT"
            )
        path = f"{self.folder}/{generation + 1:08d}.json"
        if not create_exclusive(self.fs, path, self._document()):
            _, holder = self._current()
            raise OutputInUseError(
                f"{self.output_uri}: annotate run {holder['run_id'] if holder else '?'} took the lease at the same "
                "moment; two runs must not write one OUTPUT"
            )
        self.path = path
        for older in self._generations()[:-1]:
            if older != path:
                self.fs.rm(older)
        self._renewer = threading.Thread(target=self._renew, name="annotate-lease", daemon=True)
        self._renewer.start()

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.path is not None and self.fs.exists(self.path):
            self.fs.rm(self.path)
        self.path = None

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_SECONDS):
            replace_whole(self.fs, self.path, self._document())  # read whole by runs that try to take it

    def _document(self) -> bytes:
        return json.dumps(
            {
                "run_id": self.run_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "expires": time.time() + LEASE_SECONDS,
            }
        ).encode()

    def _generations(self) -> list[str]:
        if not self.fs.exists(self.folder):
            return []
        return sorted(p for p in self.fs.ls(self.folder, detail=False) if p.endswith(".json"))

    def _current(self) -> tuple[int, dict | None]:
        generations = self._generations()
        if not generations:
            return 0, None
        latest = generations[-1]
        try:
            holder = json.loads(self.fs.cat_file(latest))
        except (FileNotFoundError, ValueError):  # released or being rewritten this instant
            holder = None
        return int(os.path.basename(latest).split(".")[0]), holder


def _alive(holder: dict) -> bool:
    """Whether a lease still binds: unexpired, and (on this host) its process still runs."""
    if holder["expires"] < time.time():
        return False
    if holder["host"] == socket.gethostname():
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    return True


def _clock(seconds: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(seconds))


def _difference(listed: Iterator[str], covered: Iterator[str]) -> tuple[list[str], list[str]]:
    """Merge the sorted file paths in OUTPUT with the sorted names the index covers: the paths it
    does not cover, and the covered names that are gone."""
    new: list[str] = []
    missing: list[str] = []
    covered_iter = iter(covered)
    pending = next(covered_iter, None)
    for path in listed:
        name = os.path.basename(path)
        while pending is not None and pending < name:
            missing.append(pending)
            pending = next(covered_iter, None)
        if pending == name:
            pending = next(covered_iter, None)
        else:
            new.append(path)
    while pending is not None:
        missing.append(pending)
        pending = next(covered_iter, None)
    return new, missing


def _has_our_schema(schema: pa.Schema) -> bool:
    """``uri`` and ``error`` of the output schema's types (the columns resuming reads)."""
    return all(
        name in schema.names and schema.field(name).type == DETECTIONS_SCHEMA.field(name).type
        for name in ("uri", "error")
    )


def _truncated(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """A file is proven truncated when it does not end with Parquet's magic bytes."""
    size = fs.size(path)
    return size < 8 or fs.cat_file(path, start=size - 4, end=size) != _PARQUET_MAGIC
