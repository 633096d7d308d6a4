"""jobs/annotate/decoding.py: the CPU stage turns a block of URIs into one prepared row each."""

from __future__ import annotations

import time

import pyarrow as pa
import pytest
import s3fs
from PIL import Image

import detr
from coco.detection_table import RETRYABLE_ERROR_PREFIX
from detr.image_decoding import ImageDecodeError, decode_image
from jobs.annotate.decoder_process import TEST_HOOK_VARIABLE, DecoderProcess
from jobs.annotate.decoding import PREPARED_SCHEMA, prepare_images
from storage import ReadPolicy

from faulty_store import Fault, FaultyStore
from images import encode, quadrants, scene


def test_prepare_images_resizes_and_keeps_one_row_per_uri(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "rotated.jpg").write_bytes(encode(Image.fromarray(quadrants(60, 80)), "JPEG", exif=exif.tobytes()))
    (tmp_path / "plain.png").write_bytes(encode(Image.fromarray(quadrants(50, 120)), "PNG"))
    (tmp_path / "empty.jpg").write_bytes(b"")
    uris = [
        f"file://{tmp_path}/rotated.jpg",
        f"file://{tmp_path}/missing.jpg",
        f"file://{tmp_path}/plain.png",
        f"file://{tmp_path}/empty.jpg",
    ]
    table = prepare_images(pa.table({"uri": uris}), min_size=32, max_size=64)
    assert table.schema.equals(PREPARED_SCHEMA)
    rows = table.to_pylist()
    assert [r["uri"] for r in rows] == uris
    rotated, missing, plain, empty = rows
    assert (rotated["width"], rotated["height"], rotated["error"]) == (60, 80, None)
    assert (rotated["resized_height"], rotated["resized_width"]) == detr.resized_shape(80, 60, 32, 64)
    assert len(rotated["pixels"]) == 3 * rotated["resized_height"] * rotated["resized_width"]
    expected = detr.resize_image(decode_image((tmp_path / "plain.png").read_bytes()), 32, 64)
    assert plain["pixels"] == expected.numpy().tobytes()
    assert missing["error"].startswith("unreadable: ") and missing["width"] is None and missing["pixels"] == b""
    assert empty["error"] == "empty file"
    with pytest.raises(ImageDecodeError, match=r"missing\.jpg: unreadable: "):
        prepare_images(pa.table({"uri": uris}), min_size=32, max_size=64, fail_on_error=True)


def test_size_column_decides_too_large_without_reading(tmp_path):
    (tmp_path / "small.png").write_bytes(encode(Image.fromarray(quadrants(50, 120)), "PNG"))
    (tmp_path / "big.png").write_bytes(encode(Image.fromarray(scene(3, 200, 300)), "PNG"))
    big_size = (tmp_path / "big.png").stat().st_size
    policy = ReadPolicy(max_bytes=big_size - 1)
    table = pa.table(
        {
            "uri": [f"file://{tmp_path}/{name}" for name in ("small.png", "big.png", "absent.png", "big.png")],
            "size": pa.array([(tmp_path / "small.png").stat().st_size, None, 10**12, None], pa.int64()),
        }
    )
    small, big, absent, _ = prepare_images(table, min_size=32, max_size=64, read_policy=policy).to_pylist()
    assert small["error"] is None and small["resized_height"] > 0
    # Unknown size: read with a cap (a local file is sized first); known: decided without a read,
    # so an object that does not exist is "too large", not "unreadable".
    assert big["error"] == f"too large: {big_size} bytes > limit {big_size - 1} (--max-object-bytes)"
    assert absent["error"] == f"too large: {10**12} bytes > limit {big_size - 1} (--max-object-bytes)"
    assert (absent["width"], absent["pixels"]) == (None, b"")


def test_empty_objects_folders_and_oversized_objects_on_s3(tmp_path, s3_bucket):
    png = encode(Image.fromarray(quadrants()), "PNG")
    s3fs.S3FileSystem(skip_instance_cache=True).pipe(
        {f"{s3_bucket}/empty.jpg": b"", f"{s3_bucket}/x.jpg/inner.png": png, f"{s3_bucket}/big.png": png + b"\0"}
    )
    (tmp_path / "x.jpg").mkdir()
    uris = [f"s3://{s3_bucket}/{name}" for name in ("empty.jpg", "x.jpg/inner.png", "big.png", "x.jpg")]
    uris.append(f"file://{tmp_path}/x.jpg")  # folders named like images, as a manifest might list them
    table = pa.table({"uri": uris})
    rows = prepare_images(table, min_size=32, max_size=64, read_policy=ReadPolicy(max_bytes=len(png))).to_pylist()
    empty, inner, big, s3_folder, local_folder = (row["error"] for row in rows)
    assert (empty, inner) == ("empty file", None)  # S3 answers a capped read of nothing with 416
    assert big == f"too large: more than {len(png)} bytes (--max-object-bytes)"  # read 1 byte past the cap
    assert s3_folder.startswith("unreadable: ") and local_folder.startswith("unreadable: ")


def test_persistent_store_faults_give_retryable_rows_that_a_fresh_read_heals(s3_bucket, s3_server, monkeypatch):
    s3fs.S3FileSystem(skip_instance_cache=True).pipe(
        {f"{s3_bucket}/{name}.png": encode(Image.fromarray(scene(i)), "PNG") for i, name in enumerate("abc")}
    )
    store = FaultyStore(s3_server, faults=[Fault("/b.png"), Fault("/c.png", times=3, kind="reset")]).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", store.endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore: one request per call; s3fs still tries 5 times
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        table = pa.table({"uri": [f"s3://{s3_bucket}/{name}.png" for name in "abc"]})
        policy = ReadPolicy(attempts=2, first_backoff_s=0.05)
        a, b, c = prepare_images(table, min_size=32, max_size=64, read_policy=policy).to_pylist()
        assert a["error"] is None and c["error"] is None  # c: reset 3 times, read within the attempt
        assert b["error"] == f"{RETRYABLE_ERROR_PREFIX}HTTP 503 SlowDown after 2 attempts"
        assert (b["width"], b["pixels"]) == (None, b"")
        store.faults = []  # the store heals: the next run's read of that row succeeds
        healed = prepare_images(table.slice(1, 1), min_size=32, max_size=64, read_policy=policy).to_pylist()[0]
        assert healed["error"] is None and (healed["width"], healed["height"]) == (96, 64)
        assert healed["pixels"] == detr.resize_image(scene(1), 32, 64).numpy().tobytes()
    finally:
        store.stop()
        s3fs.S3FileSystem.clear_instance_cache()


def test_a_decoder_crash_in_isolation_costs_one_row(tmp_path, monkeypatch):
    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(encode(Image.fromarray(scene(i)), "JPEG"))
    (tmp_path / "2.jpg").rename(tmp_path / "kills-the-decoder.jpg")
    (tmp_path / "z.jpg").write_bytes(b"%!PS\n")  # the decoder's own reasons come back from the child too
    uris = sorted(f"file://{p}" for p in tmp_path.iterdir())
    monkeypatch.setenv(TEST_HOOK_VARIABLE, "kills-the-decoder")  # test hook: that object SIGKILLs its decoder
    table = pa.table({"uri": uris})
    isolated = prepare_images(table, min_size=32, max_size=64, isolate_decoder=True).to_pylist()
    crashed = [r for r in isolated if "kills-the-decoder" in r["uri"]]
    assert [r["error"] for r in crashed] == ["decoder crashed (SIGKILL)"]
    assert [r["error"] for r in isolated if r["uri"].endswith("/z.jpg")] == ["not an image"]
    in_process = prepare_images(
        pa.table({"uri": [r["uri"] for r in isolated if r not in crashed]}), min_size=32, max_size=64
    )
    assert [r for r in isolated if r not in crashed] == in_process.to_pylist()  # same pixels either way
    with pytest.raises(ImageDecodeError, match=r"kills-the-decoder\.jpg: decoder crashed \(SIGKILL\)$"):
        prepare_images(table, min_size=32, max_size=64, isolate_decoder=True, fail_on_error=True)


def sleep_forever(uri: str, data: bytes, settings) -> None:
    """A decoder that never returns (module level: the child process imports it by name)."""
    time.sleep(3600)


def test_a_decoder_that_hangs_is_killed_after_the_timeout():
    with DecoderProcess(sleep_forever, None, timeout_s=1.0) as decoder:
        started = time.monotonic()
        with pytest.raises(ImageDecodeError, match=r"^decoder timed out after 1 s$"):
            decoder.decode("file:///slow.jpg", b"data")
        assert time.monotonic() - started < 30
