"""storage: reading many objects at once from a local folder and a real S3 server."""

from __future__ import annotations

import s3fs

from storage import read_objects


def s3() -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True)  # endpoint and keys from the s3_server env


def test_read_objects_returns_bytes_or_the_error(tmp_path, s3_bucket):
    s3().pipe({f"{s3_bucket}/a.jpg": b"remote bytes"})
    (tmp_path / "b.jpg").write_bytes(b"local bytes")
    results = read_objects([f"s3://{s3_bucket}/a.jpg", f"file://{tmp_path}/b.jpg", f"s3://{s3_bucket}/gone.jpg"])
    assert results[:2] == [b"remote bytes", b"local bytes"]
    assert isinstance(results[2], FileNotFoundError)
