"""The annotate job on what real archives hold: odd names, degenerate shapes, disguised and broken
files, a decoder that dies, a store that fails. Every object gets exactly one row, the job ends.

Real parts throughout: moto's S3 server (and a proxy in front of it that fails on purpose), a
local Ray cluster, the tiny random checkpoint; small images so each run takes seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
from PIL import Image

from coco import DETECTIONS_SCHEMA
from coco.detection_table import RETRYABLE_ERROR_PREFIX, table_files
from detr.image_decoding import FORMATS
from jobs.annotate import main, parse_config
from jobs.annotate.settings import AnnotateError
from storage import filesystem_for

from conftest import KILL_DECODER_NAME
from faulty_store import Fault, FaultyStore
from images import encode, scene

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--min-size", "128", "--max-size", "192", "--threshold", "0.01", "--actors", "1", "--cpus-per-actor", "1"]
# Each of these names holds an image of its own width, so a row shows which bytes were read.
ODD_NAMES = ["img[1].png", "*.jpg", "a?.jpg", "{a,b}.jpg", "100%.jpg", "x#y.jpg", "semi;colon.jpg"]
ODD_NAMES += ["with space.jpg", "ünïcødé 日本.jpg", "x.jpg/inner.png"]
MAX_OBJECT_BYTES = 200_000


def hostile_archive() -> tuple[dict[str, bytes], dict[str, tuple[int, int] | str]]:
    """Objects by key, and what each must become: (width, height) when annotated, else the
    start of its error."""
    objects: dict[str, bytes] = {}
    expected: dict[str, tuple[int, int] | str] = {}

    def add(name: str, data: bytes, outcome: tuple[int, int] | str) -> None:
        objects[name], expected[name] = data, outcome

    for i, name in enumerate(ODD_NAMES):
        image = Image.fromarray(scene(i, 30, 40 + i))
        add(f"names/{name}", encode(image, "PNG" if name.endswith(".png") else "JPEG"), (40 + i, 30))
    add("names/img1.png", encode(Image.fromarray(scene(50, 30, 90)), "PNG"), (90, 30))  # what a glob would find
    red = Image.new("RGB", (1, 1), (200, 30, 30))
    add("shapes/panorama-20000x1.png", encode(red.resize((20000, 1)), "PNG"), (20000, 1))
    add("shapes/strip-3000x1.jpg", encode(red.resize((3000, 1)), "JPEG"), (3000, 1))
    add("shapes/tall-1x3000.jpg", encode(red.resize((1, 3000)), "JPEG"), (1, 3000))
    add("shapes/pixel-1x1.png", encode(red, "PNG"), (1, 1))
    add("shapes/pixel-1x1.jpg", encode(red, "JPEG"), (1, 1))
    add("modes/16-bit.png", encode(Image.fromarray(scene(60)[..., 0].astype(np.uint16) * 257), "PNG"), (96, 64))
    palette = Image.fromarray(scene(61)).quantize(colors=8)
    add("modes/palette-transparent.png", encode(palette, "PNG", transparency=0), (96, 64))
    frames = [Image.fromarray(scene(62 + k)).quantize(colors=16) for k in range(3)]
    add("modes/animated.gif", encode(frames[0], "GIF", save_all=True, append_images=frames[1:]), (96, 64))
    add("modes/cmyk.jpg", encode(Image.fromarray(scene(65)).convert("CMYK"), "JPEG"), (96, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    add("modes/exif-rotated.jpg", encode(Image.fromarray(scene(66)), "JPEG", exif=exif.tobytes()), (64, 96))
    add("modes/progressive.jpg", encode(Image.fromarray(scene(67)), "JPEG", progressive=True), (96, 64))
    mpo = encode(Image.fromarray(scene(68)), "MPO", save_all=True, append_images=[Image.fromarray(scene(69))])
    add("modes/multi-picture.jpg", mpo, (96, 64))
    add("modes/photo.webp", encode(Image.fromarray(scene(70)), "WEBP"), (96, 64))
    add("modes/old.bmp", encode(Image.fromarray(scene(71)), "BMP"), (96, 64))
    add("modes/scan.tif", encode(Image.fromarray(scene(72)), "TIFF", compression="tiff_lzw"), (96, 64))
    postscript = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 48\n(hello) show\nshowpage\n"
    add("broken/postscript.jpg", postscript, "not an image")
    add("broken/zero-bytes.jpg", b"", "empty file")
    whole = encode(Image.fromarray(scene(73)), "JPEG")
    add("broken/truncated.jpg", whole[: len(whole) // 2], "truncated JPEG")
    add("broken/portable-pixmap.png", encode(Image.fromarray(scene(74)), "PPM"), "not an image")
    noise = (np.random.default_rng(0).random((300, 300, 3)) * 255).astype(np.uint8)
    large = encode(Image.fromarray(noise), "PNG")
    assert len(large) > MAX_OBJECT_BYTES
    add("broken/too-large.png", large, "too large: ")
    return objects, expected


def read_output(uri: str) -> list[dict]:
    fs, root = filesystem_for(uri)
    rows = []
    for path in table_files(fs, root):
        with fs.open(path, "rb") as stream:
            table = pq.read_table(stream)
        assert table.schema.equals(DETECTIONS_SCHEMA)
        rows += table.to_pylist()
    return rows


def test_hostile_archive_gets_one_row_per_object_and_a_rerun_adds_nothing(ray_cluster, s3_bucket, tiny_checkpoint):
    objects, expected = hostile_archive()
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.pipe({f"{s3_bucket}/archive/{name}": data for name, data in objects.items()})
    fs.pipe({f"{s3_bucket}/archive/marker.jpg/": b""})  # a folder marker named like an image: no object
    output = f"s3://{s3_bucket}/detections"
    argv = [f"s3://{s3_bucket}/archive", output, "--weights", tiny_checkpoint, *SMALL, "--batch-size", "4"]
    argv += ["--max-object-bytes", str(MAX_OBJECT_BYTES)]

    first = main(parse_config(argv))

    rows = read_output(output)
    by_name = {row["uri"].removeprefix(f"s3://{s3_bucket}/archive/"): row for row in rows}
    assert len(rows) == len(by_name) == len(objects)  # one row per object, none twice
    assert set(by_name) == set(expected)
    for name, outcome in expected.items():
        row = by_name[name]
        if isinstance(outcome, str):
            assert row["error"].startswith(outcome) and "\n" not in row["error"], (name, row["error"])
            assert (row["width"], row["height"], row["detections"]) == (None, None, []), name
        else:
            assert row["error"] is None, (name, row["error"])
            assert (row["width"], row["height"]) == outcome, name
    # Unread beyond the cap: sized by the listing ("N bytes > limit M") or by reading M + 1 bytes ("more than M").
    too_large = by_name["broken/too-large.png"]["error"]
    assert too_large.endswith(f"{MAX_OBJECT_BYTES} (--max-object-bytes)") or too_large.endswith(
        f"more than {MAX_OBJECT_BYTES} bytes (--max-object-bytes)"
    )
    errors = sum(isinstance(outcome, str) for outcome in expected.values())
    assert (first.images, first.errors, first.skipped) == (len(objects), errors, 0)

    second = main(parse_config(argv))

    assert (second.images, second.skipped) == (0, len(objects))
    assert len(read_output(output)) == len(objects)


def test_a_decoder_that_kills_its_process_costs_that_object_one_row(ray_cluster, tmp_path, tiny_checkpoint):
    """The first attempt dies with its Ray worker; the retry isolates the decoder and records the
    object that killed it. The hook (DETR_RAY_TEST_KILL_DECODER, set by the ray_cluster fixture)
    really SIGKILLs the decoding process."""
    images = tmp_path / "images"
    images.mkdir()
    names = ["a.jpg", "b.jpg", f"c-{KILL_DECODER_NAME}.jpg", "d.jpg", "e.jpg", "f.png"]
    for i, name in enumerate(names):
        image = Image.fromarray(scene(i))
        (images / name).write_bytes(encode(image, "PNG" if name.endswith(".png") else "JPEG"))
    output = tmp_path / "out"
    started = time.monotonic()

    summary = main(parse_config([str(images), str(output), "--weights", tiny_checkpoint, *SMALL, "--batch-size", "2"]))

    assert time.monotonic() - started < 300
    rows = {row["uri"].rsplit("/", 1)[1]: row for row in read_output(str(output))}
    assert sorted(rows) == sorted(names)
    assert rows[names[2]]["error"] == "decoder crashed (SIGKILL)"
    assert all(rows[name]["error"] is None and rows[name]["width"] == 96 for name in names if name != names[2])
    assert (summary.images, summary.errors) == (len(names), 1)


def run_job_with_worker_env(ray_cluster, argv: list[str], env_vars: dict[str, str]) -> subprocess.CompletedProcess:
    """``jobs.annotate`` as its own driver on the test cluster, its workers given ``env_vars``
    (the cluster's workers took their environment when it started)."""
    driver = (
        "import json, sys, ray; "
        "ray.init(address=sys.argv[1], log_to_driver=False, runtime_env={'env_vars': json.loads(sys.argv[2])}); "
        "from jobs.annotate import run; sys.exit(run(sys.argv[3:]))"
    )
    address = ray_cluster.get_runtime_context().gcs_address
    env_vars = {"PYTHONPATH": str(ROOT), **env_vars}
    command = [sys.executable, "-c", driver, address, json.dumps(env_vars), *argv]
    env = dict(os.environ, **env_vars)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_store_faults_are_retried_in_the_read_and_persistent_ones_become_retryable_rows(
    ray_cluster, s3_server, s3_bucket, tiny_checkpoint, tmp_path
):
    names = ["flaky.png", "down.png", "reset.png", "fine.png"]
    s3fs.S3FileSystem(skip_instance_cache=True).pipe(
        {f"{s3_bucket}/in/{name}": encode(Image.fromarray(scene(i)), "PNG") for i, name in enumerate(names)}
    )
    faults = [Fault("/flaky.png", times=7), Fault("/down.png"), Fault("/reset.png", times=3, kind="reset")]
    store = FaultyStore(s3_server, faults=faults).start()
    try:
        output = tmp_path / "out"
        argv = [f"s3://{s3_bucket}/in", str(output), "--weights", tiny_checkpoint, *SMALL]
        # botocore: one request per call, so a persistent fault fails in seconds (s3fs still tries 5 times).
        done = run_job_with_worker_env(ray_cluster, argv, {"AWS_ENDPOINT_URL": store.endpoint, "AWS_MAX_ATTEMPTS": "1"})
    finally:
        store.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["uri"].rsplit("/", 1)[1]: row for row in read_output(str(output))}
    assert sorted(rows) == sorted(names)
    assert rows["down.png"]["error"] == f"{RETRYABLE_ERROR_PREFIX}HTTP 503 SlowDown after 3 attempts"
    assert [rows[n]["error"] for n in ("flaky.png", "reset.png", "fine.png")] == [None, None, None]
    assert store.gets[f"/{s3_bucket}/in/flaky.png"] == 8  # 7 refused: the job read it a second time

    # The store is healthy again: the next run reads the retryable object, and only that one.
    healed = run_job_with_worker_env(ray_cluster, argv, {"AWS_ENDPOINT_URL": s3_server})
    assert healed.returncode == 0, healed.stderr[-3000:]
    assert "annotate: 1 images (1 ok, 0 errors)" in healed.stdout
    after = [(row["uri"].rsplit("/", 1)[1], row["error"] or "") for row in read_output(str(output))]
    assert sorted(after) == sorted([*((n, "") for n in names), ("down.png", rows["down.png"]["error"])])


def test_help_lists_the_formats_and_the_size_limit(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--max-object-bytes" in help_text and "(64 MiB by default)" in help_text
    assert f"only {', '.join(FORMATS)} images are decoded" in help_text
    assert "no external program is ever run" in help_text
    with pytest.raises(AnnotateError, match="--max-object-bytes must be at least 1, got 0"):
        parse_config(["--max-object-bytes", "0"])
    assert parse_config(["--max-object-bytes", "1000"]).max_object_bytes == 1000


def test_task_attempt_tells_a_retry_from_a_first_run(ray_cluster, tmp_path):
    """The decode stage isolates the decoder on retries only; Ray must say which attempt is running."""
    from jobs.annotate.decoding import task_attempt

    @ray_cluster.remote(max_retries=1)
    def attempt_after_a_crash(marker: str) -> int:
        if not os.path.exists(marker):
            Path(marker).touch()
            os.kill(os.getpid(), 9)
        return task_attempt()

    assert ray_cluster.get(ray_cluster.remote(task_attempt).remote()) == 0
    assert ray_cluster.get(attempt_after_a_crash.remote(str(tmp_path / "crashed-once"))) == 1
