"""storage: reading many objects from a local folder, a real S3 server, and one that fails on purpose."""

from __future__ import annotations

import time

import pytest
import s3fs

from storage import ObjectTooLargeError, ReadPolicy, TransientReadError, is_transient, read_objects

from faulty_store import Fault, FaultyStore

# Names a real archive holds; fs.cat would glob the first four.
ODD_NAMES = ["img[1].png", "*.jpg", "a?.jpg", "{a,b}.jpg", "100%.jpg", "x#y.jpg", "semi;colon.jpg", "with space.jpg"]
ODD_NAMES += ["ünïcødé 日本.jpg", "x.jpg/inner.png"]
FAST = ReadPolicy(attempts=2, first_backoff_s=0.05)


def s3() -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True)  # endpoint and keys from the s3_server env


def test_read_objects_returns_bytes_or_the_error(tmp_path, s3_bucket):
    s3().pipe({f"{s3_bucket}/a.jpg": b"remote bytes"})
    (tmp_path / "b.jpg").write_bytes(b"local bytes")
    results = read_objects([f"s3://{s3_bucket}/a.jpg", f"file://{tmp_path}/b.jpg", f"s3://{s3_bucket}/gone.jpg"])
    assert results[:2] == [b"remote bytes", b"local bytes"]
    assert isinstance(results[2], FileNotFoundError) and not is_transient(results[2])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_names_are_literal_never_globs(tmp_path, s3_bucket, where):
    siblings = ["img1.png", "a1.jpg", "b.jpg"]  # what img[1].png, a?.jpg and {a,b}.jpg would match as globs
    if where == "local":
        for name in ODD_NAMES + siblings:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes(name.encode())
        root = f"file://{tmp_path}"
    else:
        s3().pipe({f"{s3_bucket}/{name}": name.encode() for name in ODD_NAMES + siblings})
        root = f"s3://{s3_bucket}"
    for name in ODD_NAMES:  # alone, as in a block of one: fs.cat of ["img[1].png"] found nothing
        assert read_objects([f"{root}/{name}"]) == [name.encode()], name
    assert read_objects([f"{root}/{name}" for name in ODD_NAMES]) == [name.encode() for name in ODD_NAMES]
    folder = read_objects([f"{root}/x.jpg"])[0]  # a folder named like an image is no object
    assert isinstance(folder, (IsADirectoryError, FileNotFoundError))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_objects_over_the_size_limit_are_not_read_whole(tmp_path, s3_bucket, where):
    contents = {"small.jpg": b"x" * 100, "exact.jpg": b"y" * 1000, "big.jpg": b"z" * 5000, "empty.jpg": b""}
    if where == "local":
        for name, data in contents.items():
            (tmp_path / name).write_bytes(data)
        root = f"file://{tmp_path}"
    else:
        s3().pipe({f"{s3_bucket}/{name}": data for name, data in contents.items()})
        root = f"s3://{s3_bucket}"
    uris = [f"{root}/{name}" for name in contents]
    small, exact, big, empty = read_objects(uris, policy=ReadPolicy(max_bytes=1000))
    assert (small, exact, empty) == (contents["small.jpg"], contents["exact.jpg"], b"")  # S3: a range of nothing
    assert isinstance(big, ObjectTooLargeError)  # locally sized first, on S3 found by reading 1001 bytes
    assert str(big) == ("5000 bytes > limit 1000" if where == "local" else "more than 1000 bytes")
    # A size from the listing decides without a read: this object does not even exist.
    known = read_objects([f"{root}/missing.jpg", uris[0]], sizes=[10**9, 100], policy=ReadPolicy(max_bytes=1000))
    assert isinstance(known[0], ObjectTooLargeError) and str(known[0]) == "1000000000 bytes > limit 1000"
    assert known[1] == contents["small.jpg"]


@pytest.fixture
def faulty_store(s3_server, monkeypatch):
    """The FaultyStore proxy in front of moto, and s3fs pointed at it; botocore's own retries are
    cut to one request per call so a persistent fault fails in seconds (s3fs still retries)."""
    store = FaultyStore(s3_server).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", store.endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()  # instances remember the endpoint they were made with
    yield store
    store.stop()
    s3fs.S3FileSystem.clear_instance_cache()


def test_transient_faults_are_read_again_and_persistent_ones_say_so(s3_bucket, faulty_store):
    names = ("flaky.jpg", "reset.jpg", "down.jpg", "dropped.jpg", "ok.jpg")
    s3().pipe({f"{s3_bucket}/{name}": name.encode() for name in names})
    faulty_store.faults = [
        Fault("flaky.jpg", times=7),
        Fault("reset.jpg", times=2, kind="reset"),
        Fault("down.jpg"),
        Fault("dropped.jpg", kind="reset"),
    ]
    uris = [f"s3://{s3_bucket}/{name}" for name in (*names, "gone.jpg")]
    started = time.monotonic()
    flaky, reset, down, dropped, ok, gone = read_objects(uris, policy=FAST)
    assert (flaky, reset, ok) == (b"flaky.jpg", b"reset.jpg", b"ok.jpg")
    assert isinstance(down, TransientReadError) and str(down) == "HTTP 503 SlowDown after 2 attempts"
    assert isinstance(dropped, TransientReadError) and str(dropped) == "connection reset after 2 attempts"
    assert isinstance(gone, FileNotFoundError)  # permanent: read once
    gets = faulty_store.gets
    assert gets[f"/{s3_bucket}/flaky.jpg"] == 8  # 7 refused: more than s3fs's 5 tries, so read twice
    assert gets[f"/{s3_bucket}/reset.jpg"] == 3
    assert gets[f"/{s3_bucket}/gone.jpg"] == 1 and gets[f"/{s3_bucket}/ok.jpg"] == 1
    assert gets[f"/{s3_bucket}/down.jpg"] >= 2  # every attempt, each with s3fs's own tries
    assert time.monotonic() - started < 60

    faulty_store.faults = []  # the store heals: a fresh read succeeds
    assert read_objects([uris[2], uris[3]], policy=FAST) == [b"down.jpg", b"dropped.jpg"]
