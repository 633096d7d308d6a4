"""jobs/annotate/done_index.py: sorted segments of done URIs, built and merged in bounded memory."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

import jobs.annotate.done_index as done_index
from jobs.annotate.done_index import DoneCursor, DoneIndex, merge_sorted
from storage import filesystem_for


@pytest.fixture
def small_parts(monkeypatch):
    """Parts and sort chunks a few hundred URIs long, so a test's thousands span many of them."""
    monkeypatch.setattr(done_index, "PART_ROWS", 300)
    monkeypatch.setattr(done_index, "CHUNK_ROWS", 1000)


def uris(numbers) -> list[str]:
    return [f"s3://bucket/images/{n:06d}.jpg" for n in numbers]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_cursor_answers_exactly_the_done_uris(tmp_path, s3_bucket, small_parts, where):
    index = DoneIndex(*filesystem_for(str(tmp_path) if where == "local" else f"s3://{s3_bucket}/out"))
    rng = random.Random(0)
    done = set(rng.sample(range(20_000), 7000))
    shuffled = uris(rng.sample(sorted(done), len(done)))
    repeated = shuffled + shuffled[:500]  # a URI may come twice (two runs); the segment holds it once
    first = index.build((pa.array(repeated[i : i + 900]) for i in range(0, len(repeated), 900)), ["f-a", "f-b"])
    second = index.build([pa.array(uris([20_001, 3]))], ["f-c"])
    index.commit([first, second])
    segments = index.segments()

    assert [s.rows for s in segments] == [7000, 2] and len(segments[0].parts) == 24
    assert list(index.covered_files(segments)) == ["f-a", "f-b", "f-c"]
    cursor = DoneCursor(index, segments)
    everything = uris(range(20_002))
    answers = [a for i in range(0, len(everything), 1000) for a in cursor.contains(everything[i : i + 1000])]
    assert answers == [u in set(uris(done | {20_001, 3})) for u in everything]
    assert all(len(part) <= done_index.PART_ROWS for _, part in cursor._loaded.values())  # one part per segment
    below = uris([n for n in done | {3} if n < 5000])
    assert cursor.last_done_before(uris([5000])[0]) == max(below)
    assert cursor.last_done_before(None) == uris([20_001])[0]


def test_merge_keeps_every_uri_once_and_covers_all_files(tmp_path, small_parts):
    index = DoneIndex(*filesystem_for(str(tmp_path)))
    a = index.build([pa.array(uris(range(0, 3000, 2)))], ["f1"])
    b = index.build([pa.array(uris(range(0, 3000, 3)))], ["f2", "f3"])
    merged = index.merge([a, b], ["f4"])
    values = [u for array in index.read(merged) for u in array.to_pylist()]
    assert values == sorted(set(uris(range(0, 3000, 2)) + uris(range(0, 3000, 3))))
    assert list(index.covered_files([merged])) == ["f1", "f2", "f3", "f4"]
    index.commit([merged], retired=[a, b])
    assert not (tmp_path / "_index" / a.id).exists() and (tmp_path / "_index" / merged.id).exists()


def test_streaming_merge_of_sorted_streams():
    rng = random.Random(1)
    streams = [sorted(rng.sample(range(5000), 800)) for _ in range(5)]

    def chunks(values, size):
        return (pa.array(uris(values[i : i + size])) for i in range(0, len(values), size))

    merged = [u for c in merge_sorted([chunks(s, rng.randint(1, 200)) for s in streams]) for u in c.to_pylist()]
    expected = sorted(set(uris(sorted({v for s in streams for v in s}))))
    deduplicated = [u for i, u in enumerate(merged) if i == 0 or u != merged[i - 1]]
    assert deduplicated == expected and merged == sorted(merged)
