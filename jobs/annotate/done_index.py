"""The done index: the URIs OUTPUT already holds, kept sorted so that resuming costs constant memory.

What counts as done is the public contract: the rows of the job's Parquet files in OUTPUT
(:mod:`jobs.annotate.output`). Reading all of them at every start would hold every URI at once
(10^8 URIs: ~15 GB as Python strings) and read every file before the first image. The index is
a cache of them, beside the files, in the shape a sorted listing can be merged against:

    OUTPUT/_index/catalog.json              the segments and, per segment, its parts' key ranges
    OUTPUT/_index/<segment>/part-NNNNN.parquet   sorted, unique ``uri`` values, PART_ROWS per part
    OUTPUT/_index/<segment>/files.parquet        the output files the segment was built from

A listing range opens one :class:`DoneCursor` over the segments, which streams each segment's
parts in key order alongside the listing, holding one part (PART_ROWS URIs) per segment. New
output files become a new segment when a run ends (or, for a killed run, when the next one
starts); segments are merged once there are more than MAX_SEGMENTS of them, so a cursor never
holds more than MAX_SEGMENTS + 1 parts. Building is an external sort (sorted chunks of
CHUNK_ROWS, then a streaming merge), merging is a streaming merge: memory stays flat whatever
OUTPUT holds.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

INDEX_FOLDER = "_index"
CATALOG = "catalog.json"
PART_ROWS = 65536  # URIs per part file: ~5 MB, the most a cursor holds per segment
CHUNK_ROWS = 1 << 20  # URIs sorted in memory at once while building a segment (~100 MB)
MAX_SEGMENTS = 8


@dataclass(frozen=True)
class Part:
    name: str  # file name inside the segment's folder
    first: str  # smallest URI in the part
    last: str  # largest URI in the part
    rows: int


@dataclass(frozen=True)
class Segment:
    id: str
    parts: tuple[Part, ...]
    files: int  # output files the segment covers (listed in its files.parquet)

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    @classmethod
    def from_dict(cls, values: dict) -> Segment:
        return cls(values["id"], tuple(Part(**p) for p in values["parts"]), values["files"])


class DoneIndex:
    """The index of one OUTPUT folder: its catalog, readers and writers of segments."""

    def __init__(self, fs: fsspec.AbstractFileSystem, output_root: str) -> None:
        self.fs = fs
        self.root = f"{output_root.rstrip('/')}/{INDEX_FOLDER}"

    # --- catalog -------------------------------------------------------------------------------

    def segments(self) -> list[Segment]:
        """The catalog's segments ([] without an index)."""
        try:
            with self.fs.open(f"{self.root}/{CATALOG}", "rb") as stream:
                return [Segment.from_dict(s) for s in json.load(stream)["segments"]]
        except FileNotFoundError:
            return []

    def commit(self, segments: Sequence[Segment], retired: Sequence[Segment] = ()) -> None:
        """Make ``segments`` the index (one object write, so readers see the old or the new catalog),
        then delete the folders of ``retired`` segments."""
        document = {"version": 1, "segments": [asdict(s) for s in segments]}
        self.fs.pipe_file(f"{self.root}/{CATALOG}", json.dumps(document).encode())
        for segment in retired:
            self.fs.rm(f"{self.root}/{segment.id}", recursive=True)

    def covered_files(self, segments: Sequence[Segment]) -> Iterator[str]:
        """The output file names the segments were built from, ascending (a streaming merge)."""
        streams = [self._files_of(s) for s in segments if s.files]
        for chunk in merge_sorted(streams):
            yield from chunk.to_pylist()

    def _files_of(self, segment: Segment) -> Iterator[pa.Array]:
        with self.fs.open(f"{self.root}/{segment.id}/files.parquet", "rb") as stream:
            for batch in pq.ParquetFile(stream).iter_batches(columns=["file"], batch_size=PART_ROWS):
                yield batch.column(0)

    # --- building ------------------------------------------------------------------------------

    def build(self, uris: Iterable[pa.Array], files: Sequence[str]) -> Segment:
        """A new segment of the (unsorted, possibly repeated) ``uris``, built from the output ``files``.

        External sort: chunks of CHUNK_ROWS are sorted in memory and written as temporary
        segments, which are then merged; a single chunk is written directly.
        """
        runs: list[Segment] = []
        chunk: list[pa.Array] = []
        rows = 0
        for array in uris:
            chunk.append(array)
            rows += len(array)
            if rows >= CHUNK_ROWS:
                runs.append(self._write_sorted([_sorted_unique(pa.concat_arrays(chunk))], []))
                chunk, rows = [], 0
        if chunk or not runs:
            runs.append(self._write_sorted([_sorted_unique(pa.concat_arrays(chunk) if chunk else _EMPTY)], []))
        if len(runs) == 1:
            return self._with_files(runs[0], files)
        merged = self.merge(runs, files)
        for run in runs:
            self.fs.rm(f"{self.root}/{run.id}", recursive=True)
        return merged

    def merge(self, segments: Sequence[Segment], files: Sequence[str] | None = None) -> Segment:
        """One segment holding every URI of ``segments`` (a streaming k-way merge); it covers
        their files plus ``files``."""
        merged = self._write_sorted(merge_sorted([self.read(s) for s in segments]), [])
        covered = list(self.covered_files(segments)) if files is None else [*self.covered_files(segments), *files]
        return self._with_files(merged, sorted(covered))

    def read(self, segment: Segment, first_part: int = 0) -> Iterator[pa.Array]:
        """The segment's URIs in order, a part at a time."""
        for part in segment.parts[first_part:]:
            with self.fs.open(f"{self.root}/{segment.id}/{part.name}", "rb") as stream:
                yield pq.read_table(stream).column("uri").combine_chunks()

    def _write_sorted(self, arrays: Iterable[pa.Array], files: Sequence[str]) -> Segment:
        """Write sorted arrays (consecutive ones may repeat the boundary value) as a new segment."""
        segment_id = uuid.uuid4().hex[:12]
        folder = f"{self.root}/{segment_id}"
        self.fs.makedirs(folder, exist_ok=True)
        parts: list[Part] = []
        pending: list[pa.Array] = []
        pending_rows = 0
        previous: str | None = None
        for array in arrays:
            if previous is not None and len(array) and array[0].as_py() == previous:
                array = array.slice(1)  # the merge may hand the same value over a chunk boundary
            if not len(array):
                continue
            previous = array[-1].as_py()
            pending.append(array)
            pending_rows += len(array)
            while pending_rows >= PART_ROWS:
                whole = pa.concat_arrays(pending)
                parts.append(self._write_part(folder, len(parts), whole.slice(0, PART_ROWS)))
                rest = whole.slice(PART_ROWS)
                pending, pending_rows = ([rest] if len(rest) else []), len(rest)
        if pending_rows:
            parts.append(self._write_part(folder, len(parts), pa.concat_arrays(pending)))
        return self._with_files(Segment(segment_id, tuple(parts), 0), files)

    def _write_part(self, folder: str, number: int, uris: pa.Array) -> Part:
        name = f"part-{number:05d}.parquet"
        with self.fs.open(f"{folder}/{name}", "wb") as stream:
            pq.write_table(pa.table({"uri": uris}), stream, compression="zstd")
        return Part(name, uris[0].as_py(), uris[-1].as_py(), len(uris))

    def _with_files(self, segment: Segment, files: Sequence[str]) -> Segment:
        with self.fs.open(f"{self.root}/{segment.id}/files.parquet", "wb") as stream:
            pq.write_table(pa.table({"file": pa.array(sorted(files), pa.string())}), stream)
        return Segment(segment.id, segment.parts, len(files))


class DoneCursor:
    """Which URIs of a sorted stream the index holds, reading each segment once, in step with the stream.

    Call :meth:`contains` with pages in ascending order (each page sorted, later pages after
    earlier ones); each segment's parts are read only where they overlap the pages.
    """

    def __init__(self, index: DoneIndex, segments: Sequence[Segment]) -> None:
        self.index = index
        self.segments = [s for s in segments if s.parts]
        self._loaded: dict[str, tuple[int, np.ndarray]] = {}  # segment id -> (part number, its URIs)

    def contains(self, page: Sequence[str]) -> np.ndarray:
        """For each URI of ``page`` (ascending), whether it is done: ``bool[len(page)]``."""
        done = np.zeros(len(page), dtype=bool)
        if not page:
            return done
        values = np.asarray(page, dtype=object)
        for segment in self.segments:
            for uris in self._overlapping(segment, page[0], page[-1]):
                # Both sorted: binary search each page URI in the part, then compare.
                positions = np.minimum(np.searchsorted(uris, values), len(uris) - 1)
                done |= uris[positions] == values
        return done

    def last_done_before(self, end: str | None) -> str | None:
        """The largest done URI below ``end`` (None: unbounded), or None if there is none."""
        best: str | None = None
        for segment in self.segments:
            for part in reversed(segment.parts):
                if end is None or part.first < end:
                    if end is None or part.last < end:
                        candidate = part.last
                    else:
                        uris = next(self.index.read(segment, segment.parts.index(part)))
                        below = uris.filter(pc.less(uris, end))
                        candidate = below[-1].as_py() if len(below) else None
                    if candidate is not None and (best is None or candidate > best):
                        best = candidate
                    break
        return best

    def _overlapping(self, segment: Segment, lo: str, hi: str) -> Iterator[pa.Array]:
        for number, part in enumerate(segment.parts):
            if part.last < lo:
                continue
            if part.first > hi:
                break
            loaded = self._loaded.get(segment.id)
            if loaded is None or loaded[0] != number:
                uris = next(self.index.read(segment, number)).to_numpy(zero_copy_only=False).astype(object)
                self._loaded[segment.id] = loaded = (number, uris)
            yield loaded[1]


_EMPTY = pa.array([], pa.string())


def _sorted_unique(values: pa.Array) -> pa.Array:
    values = values.filter(pc.is_valid(values))
    return pc.unique(values.take(pc.sort_indices(values))) if len(values) else values


def merge_sorted(streams: Sequence[Iterator[pa.Array]]) -> Iterator[pa.Array]:
    """Merge ascending streams of string arrays into ascending arrays, a bounded chunk at a time.

    Each round takes from every stream what is at most the smallest of their buffered last
    values (nothing later can be smaller), sorts that slice and hands it on. Values equal
    across streams come out together, or at the start of the next chunk.
    """
    buffers: list[pa.Array | None] = [None] * len(streams)
    while True:
        for i, stream in enumerate(streams):
            while buffers[i] is not None and not len(buffers[i]):
                buffers[i] = None
            if buffers[i] is None:
                buffers[i] = next((a for a in stream if len(a)), None)
        live = [b for b in buffers if b is not None]
        if not live:
            return
        bound = min(b[-1].as_py() for b in live)
        taken = []
        for i, buffer in enumerate(buffers):
            if buffer is None:
                continue
            count = pc.sum(pc.less_equal(buffer, bound)).as_py() or 0  # sorted: a prefix
            taken.append(buffer.slice(0, count))
            buffers[i] = buffer.slice(count)
        chunk = pa.concat_arrays(taken)
        yield pc.unique(chunk.take(pc.sort_indices(chunk)))
