"""jobs/annotate/output.py: what counts as done in OUTPUT, on a local folder and a real S3 server."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.annotate.listing import ImageSourceError
from jobs.annotate.output import completed_uris
from storage import arrow_filesystem


def _write_output(fs_path: str, uris: list[str], filesystem) -> None:
    pq.write_table(pa.table({"uri": uris, "error": [None] * len(uris)}), fs_path, filesystem=filesystem)


def test_completed_uris_reads_complete_files_and_removes_broken_ones(tmp_path, s3_bucket, capsys):
    assert completed_uris(str(tmp_path / "new")) is None
    out = tmp_path / "out"
    out.mkdir()
    local_fs, root = arrow_filesystem(str(out))
    _write_output(f"{root}/annotations-run1-aa_000000-0.parquet", ["u1", "u2"], local_fs)
    _write_output(f"{root}/annotations-run1-aa_000001-0.parquet", ["u3"], local_fs)
    whole = (out / "annotations-run1-aa_000001-0.parquet").read_bytes()
    (out / "annotations-run2-bb_000000-0.parquet").write_bytes(whole[: len(whole) // 2])  # killed mid-write
    assert sorted(completed_uris(str(out)).to_pylist()) == ["u1", "u2", "u3"]
    assert not (out / "annotations-run2-bb_000000-0.parquet").exists()
    assert "removing incomplete output file" in capsys.readouterr().err
    (out / "someone-elses.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ImageSourceError, match=r"someone-elses\.parquet: unreadable Parquet file in OUTPUT"):
        completed_uris(str(out))

    remote_fs, remote_root = arrow_filesystem(f"s3://{s3_bucket}/out")  # fsspec-backed: honours AWS_ENDPOINT_URL
    _write_output(f"{remote_root}/annotations-run1-cc_000000-0.parquet", ["s3://x/1.jpg"], remote_fs)
    assert completed_uris(f"s3://{s3_bucket}/out").to_pylist() == ["s3://x/1.jpg"]
