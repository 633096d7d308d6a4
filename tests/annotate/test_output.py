"""jobs/annotate/output.py: what counts as done in OUTPUT, the lease, the marker; local folder and a real S3 server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import jobs.annotate.output as output_module
from coco import DETECTIONS_SCHEMA, RETRYABLE_ERROR_PREFIX
from jobs.annotate.done_index import DoneCursor
from jobs.annotate.listing import ImageSourceError
from jobs.annotate.output import OutputFolder, OutputInUseError, Summary


def write_rows(output: OutputFolder, name: str, uris: list[str], errors: list[str | None] | None = None) -> None:
    errors = errors or [None] * len(uris)
    ok = {"width": 1, "height": 1, "detections": [], "model": "m"}
    rows = [{"uri": u, "error": e, **ok} for u, e in zip(uris, errors)]
    with output.fs.open(f"{output.root}/{name}", "wb") as stream:
        pq.write_table(pa.Table.from_pylist(rows, schema=DETECTIONS_SCHEMA), stream)


def done(output: OutputFolder, candidates: list[str]) -> list[str]:
    segments = output.done_segments()
    return [u for u, d in zip(candidates, DoneCursor(output.index, segments).contains(sorted(candidates))) if d]


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path, s3_bucket) -> OutputFolder:
    folder = OutputFolder(str(tmp_path / "out") if request.param == "local" else f"s3://{s3_bucket}/out")
    folder.prepare()
    return folder


def test_done_is_the_readable_rows_of_our_files_minus_retryable_errors(output, capsys):
    write_rows(output, "annotations-run1-aa_000000.parquet", ["u1", "u2", "u3"], [None, "not an image", None])
    retry = f"{RETRYABLE_ERROR_PREFIX}503 SlowDown"
    write_rows(output, "annotations-run1-aa_000001.parquet", ["u4", "u5"], [retry, None])
    write_rows(output, "results-of-mine.parquet", ["u6"])  # another name: never done, never deleted
    with output.fs.open(f"{output.root}/annotations-run3-cc_000000.parquet", "wb") as stream:
        pq.write_table(pa.table({"uri": ["u7"], "score": [0.5]}), stream)  # our name, another schema
    candidates = [f"u{i}" for i in range(1, 9)]

    assert sorted(done(output, candidates)) == ["u1", "u2", "u3", "u5"]  # u4's error is retryable
    assert output.fs.exists(f"{output.root}/results-of-mine.parquet")
    assert output.fs.exists(f"{output.root}/annotations-run3-cc_000000.parquet")
    assert "not in the output schema" in capsys.readouterr().err

    # A file added later (a killed run's) joins the index as a new segment; the old one stays.
    write_rows(output, "annotations-run2-bb_000000.parquet", ["u4", "u8"])
    assert sorted(done(output, candidates)) == ["u1", "u2", "u3", "u4", "u5", "u8"]
    assert len(output.index.segments()) == 2
    # A file removed by hand: the index is rebuilt from the files that are there.
    output.fs.rm(f"{output.root}/annotations-run1-aa_000000.parquet")
    assert sorted(done(output, candidates)) == ["u4", "u5", "u8"]
    assert "rebuilding the done index" in capsys.readouterr().err


def test_only_proven_truncated_files_of_our_naming_are_deleted(tmp_path, capsys):
    output = OutputFolder(str(tmp_path))
    write_rows(output, "annotations-run1-aa_000000.parquet", ["u1", "u2"])
    whole = (tmp_path / "annotations-run1-aa_000000.parquet").read_bytes()
    (tmp_path / "annotations-run2-bb_000000.parquet").write_bytes(whole[: len(whole) // 2])  # killed mid-write
    (tmp_path / "annotations-run2-bb_000001.parquet").write_bytes(b"")
    (tmp_path / "annotations-run3-cc_000000.parquet").write_bytes(b"garbage" + b"PAR1")  # complete, but corrupt
    (tmp_path / "theirs.parquet").write_bytes(whole[: len(whole) // 2])  # truncated, but not ours

    assert done(output, ["u1", "u2"]) == ["u1", "u2"]
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert names == ["annotations-run1-aa_000000.parquet", "annotations-run3-cc_000000.parquet", "theirs.parquet"]
    err = capsys.readouterr().err
    assert err.count("removing incomplete output file") == 2 and "ignoring unreadable output file" in err


def test_index_of_a_run_and_merging_segments(output, monkeypatch):
    monkeypatch.setattr(output_module, "MAX_SEGMENTS", 2)
    segments = output.done_segments()
    for run in range(4):
        write_rows(output, f"annotations-run{run}-x_000000.parquet", [f"u{run}a", f"u{run}b"])
        segments = output.index_run(f"run{run}", segments)
        assert len(segments) <= 2
    assert sorted(done(output, [f"u{r}{s}" for r in range(4) for s in "ab"])) == [
        f"u{r}{s}" for r in range(4) for s in "ab"
    ]
    assert len(output.index.segments()) <= 2  # the next start finds nothing new to index


def test_a_second_run_is_refused_while_the_lease_is_live(output):
    with output.lease("first"):
        with pytest.raises(OutputInUseError, match="is being written by annotate run first") as refused:
            output.lease("second").acquire()
        assert "\n" not in str(refused.value)
    with output.lease("third"):  # released: free again
        pass


def test_racing_runs_get_one_lease(output):
    outcomes: list[str] = []
    all_tried = threading.Barrier(4)

    def take(run: str) -> None:
        lease = output.lease(run)
        try:
            lease.acquire()
            outcomes.append("won")
        except OutputInUseError:
            outcomes.append("refused")
        all_tried.wait()  # hold the lease until every run has tried
        lease.release()

    threads = [threading.Thread(target=take, args=(f"run{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused"] * 3 + ["won"]


def killed_run_lease(output: OutputFolder, generation: int, host: str, pid: int, expires: float) -> None:
    """The lease file a run leaves when it is killed: nobody renews or removes it."""
    document = {"run_id": f"killed{generation}", "host": host, "pid": pid, "expires": expires}
    output.fs.makedirs(f"{output.root}/_lease", exist_ok=True)
    output.fs.pipe_file(f"{output.root}/_lease/{generation:08d}.json", json.dumps(document).encode())


def test_a_killed_runs_lease_is_taken_over(output):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    # Same host, process gone: taken over at once although it has not expired.
    killed_run_lease(output, 1, socket.gethostname(), int(gone.stdout), time.time() + 600)
    with output.lease("next"):
        pass
    # Another host: binding until it expires, then taken over.
    killed_run_lease(output, 5, "elsewhere", 1, time.time() + 600)
    with pytest.raises(OutputInUseError, match="killed5"):
        output.lease("too-early").acquire()
    killed_run_lease(output, 6, "elsewhere", 1, time.time() - 1)
    with output.lease("after-expiry"):
        pass


def test_output_in_the_place_of_a_file_is_refused(output):
    output.fs.pipe_file(f"{output.root}/taken", b"x")
    with pytest.raises(ImageSourceError, match="taken: exists and is not a folder"):
        OutputFolder(f"{output.uri}/taken").prepare()
    OutputFolder(f"{output.uri}/fresh").prepare()  # a folder yet to be made is fine
    OutputFolder(output.uri).prepare()  # and so is one with files in it


def test_marker_is_written_at_the_end_and_cleared_at_the_start(output):
    summary = Summary(output.uri, "run1", images=3, errors=1, retryable=1, detections=7, skipped=2, seconds=1.5)
    output.write_marker(summary, "detr-r50@abc", {"input": "s3://b/in"})
    marker = output.fs.cat_file(f"{output.root}/_SUCCESS.json").decode()
    assert '"retryable_errors": 1' in marker and '"model": "detr-r50@abc"' in marker
    assert '"startup_seconds": null' in marker  # no batch was annotated
    output.clear_marker()
    assert not output.fs.exists(f"{output.root}/_SUCCESS.json")
