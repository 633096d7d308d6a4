"""The annotate job end to end on a local Ray cluster: a real S3 server, real kills, real Parquet.

Runs use the tiny random checkpoint, small images and a low threshold (random weights score
low) so every Ray run takes seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from PIL import Image

import detr
from coco import DETECTIONS_SCHEMA
from coco.detection_table import incomplete_warning, table_files
from jobs.annotate import main, parse_config, run
from jobs.coco_export import export_coco_results
from storage import filesystem_for

from detection_checks import assert_same_detections, direct_detections
from images import encode, scene

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_IMAGES = ROOT / "jobs" / "annotate" / "sample_images"
SMALL = ["--min-size", "128", "--max-size", "192", "--threshold", "0.01"]


def mixed_archive() -> tuple[dict[str, bytes], dict[str, str]]:
    """Dozens of images of every mode we claim to handle, plus broken objects and their reasons.
    Landscape images are all 96x64 and portrait ones 64x96, so aspect grouping never pads."""
    objects: dict[str, bytes] = {}
    for i in range(8):
        objects[f"rgb/{i:02d}.jpg"] = encode(Image.fromarray(scene(i)), "JPEG", quality=90)
        objects[f"portrait/{i:02d}.jpg"] = encode(Image.fromarray(scene(100 + i, 96, 64)), "JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    objects["modes/exif-rotated.jpg"] = encode(Image.fromarray(scene(20)), "JPEG", exif=exif.tobytes())
    objects["modes/gray.jpg"] = encode(Image.fromarray(scene(21)).convert("L"), "JPEG")
    objects["modes/cmyk.jpg"] = encode(Image.fromarray(scene(22)).convert("CMYK"), "JPEG")
    objects["modes/sixteen-bit.png"] = encode(Image.fromarray(scene(23)[..., 0].astype(np.uint16) * 257), "PNG")
    objects["modes/palette.png"] = encode(Image.fromarray(scene(24)).quantize(colors=16), "PNG")
    rgba = np.dstack([scene(25), np.full((64, 96), 255, np.uint8)])
    rgba[:, :48, 3] = 0
    objects["modes/alpha.png"] = encode(Image.fromarray(rgba, "RGBA"), "PNG")
    objects["modes/photo.webp"] = encode(Image.fromarray(scene(26)), "WEBP")
    objects["modes/UPPER.JPG"] = encode(Image.fromarray(scene(27)), "JPEG")
    good_jpeg = objects["rgb/00.jpg"]
    objects["broken/truncated.jpg"] = good_jpeg[: len(good_jpeg) // 2]
    objects["broken/zero-bytes.jpg"] = b""
    objects["broken/text.jpg"] = b"this is a text file with a .jpg name\n"
    objects["broken/bomb.png"] = _png_header(15_000, 10_000)
    objects["ignored/readme.txt"] = b"not listed: extension filter"
    reasons = {
        "broken/truncated.jpg": "truncated JPEG",
        "broken/zero-bytes.jpg": "empty file",
        "broken/text.jpg": "not an image",
        "broken/bomb.png": "decompression bomb: 15000x10000",
    }
    return objects, reasons


def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


def read_output(uri: str) -> pa.Table:
    fs, root = filesystem_for(uri)
    tables = []
    for path in table_files(fs, root):
        with fs.open(path, "rb") as stream:
            tables.append(pq.read_table(stream))
    return pa.concat_tables(tables) if tables else DETECTIONS_SCHEMA.empty_table()


def test_s3_archive_of_mixed_formats(ray_cluster, s3_bucket, tiny_checkpoint):
    objects, reasons = mixed_archive()
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.pipe({f"{s3_bucket}/archive/{name}": data for name, data in objects.items()})
    output = f"s3://{s3_bucket}/detections"

    summary = main(
        parse_config(
            [
                f"s3://{s3_bucket}/archive",
                output,
                "--weights",
                tiny_checkpoint,
                *SMALL,
                "--actors",
                "2",
                "--cpus-per-actor",
                "1",
                "--batch-size",
                "4",
            ]
        )
    )

    table = read_output(output)
    assert table.schema.equals(DETECTIONS_SCHEMA)  # the exact Arrow schema, not just the names
    rows = {row["uri"]: row for row in table.to_pylist()}
    images = {f"s3://{s3_bucket}/archive/{n}": d for n, d in objects.items() if not n.endswith(".txt")}
    assert table.num_rows == len(images) == len(rows) == 28  # one row per object, no duplicates
    assert set(rows) == set(images)
    model = detr.from_pretrained(tiny_checkpoint)
    for uri, data in images.items():
        row = rows[uri]
        assert row["model"] == model.weights_name
        name = uri.split("/archive/")[1]
        if name in reasons:
            assert row["error"].startswith(reasons[name]) and "\n" not in row["error"]
            assert row["detections"] == [] and row["width"] is None and row["height"] is None
            continue
        assert row["error"] is None
        portrait = name.startswith("portrait/") or name == "modes/exif-rotated.jpg"
        assert (row["width"], row["height"]) == ((64, 96) if portrait else (96, 64))
        assert row["detections"], uri
        assert_same_detections(row["detections"], direct_detections(model, data))
    assert (summary.images, summary.errors, summary.skipped) == (28, 4, 0)
    assert summary.detections == sum(len(r["detections"]) for r in rows.values())


def _alive_detector_actors() -> list[dict]:
    from ray._private import state

    return [a for a in state.actors().values() if "Detector" in a["ActorClassName"] and a["State"] == "ALIVE"]


def _write_folder(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"{i:03d}.jpg").write_bytes(encode(Image.fromarray(scene(i)), "JPEG"))
    return sorted(f"file://{folder}/{i:03d}.jpg" for i in range(count))


def _write_images(where: str, tmp_path: Path, bucket: str, count: int) -> tuple[str, str, list[str]]:
    """``count`` JPEGs in a local folder or a bucket: (INPUT, OUTPUT, the image URIs)."""
    if where == "local":
        return str(tmp_path / "images"), str(tmp_path / "out"), _write_folder(tmp_path / "images", count)
    images = {f"{bucket}/images/{i:03d}.jpg": encode(Image.fromarray(scene(i)), "JPEG") for i in range(count)}
    s3fs.S3FileSystem(skip_instance_cache=True).pipe(images)
    return f"s3://{bucket}/images", f"s3://{bucket}/out", sorted(f"s3://{p}" for p in images)


def _output_files(output: str) -> list[str]:
    fs, root = filesystem_for(output)
    fs.invalidate_cache()
    return table_files(fs, root) if fs.exists(root) else []


def _assert_each_once(output: str | Path, expected: list[str]) -> None:
    uris = read_output(str(output)).column("uri").to_pylist()
    assert len(uris) == len(set(uris)), "duplicate rows"
    assert sorted(uris) == expected, "missing rows"


def _slow_run(inputs: str, output: str, tiny_checkpoint: str) -> list[str]:
    """A run that writes many small files: batches of 2, a file every 2 rows, one actor."""
    return [
        inputs, output, "--weights", tiny_checkpoint, "--threshold", "0.01", "--min-size", "384", "--max-size", "512",
        "--batch-size", "2", "--rows-per-file", "2", "--actors", "1", "--cpus-per-actor", "1",
    ]  # fmt: skip


def _start_job(argv: list[str], ray_cluster, log: Path) -> subprocess.Popen:
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    with open(log, "wb") as stream:
        return subprocess.Popen(
            [sys.executable, "-m", "jobs.annotate", *argv], cwd=ROOT, env=env, stdout=stream,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def _wait_for(condition, job: subprocess.Popen, log: Path, what: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert job.poll() is None, f"job ended before {what}:\n{log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no {what} after {seconds} s"
        time.sleep(0.05)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_killed_job_resumes_with_every_image_exactly_once(ray_cluster, tmp_path, s3_bucket, tiny_checkpoint, where):
    inputs, output, expected = _write_images(where, tmp_path, s3_bucket, 80)
    argv = _slow_run(inputs, output, tiny_checkpoint)
    job = _start_job(argv, ray_cluster, tmp_path / "job.log")
    try:
        _wait_for(lambda: len(_output_files(output)) >= 3, job, tmp_path / "job.log", "three output files")
    finally:
        job.send_signal(signal.SIGKILL)  # the driver, as a preempted head node would lose it
        job.wait()
    deadline = time.monotonic() + 60
    while _alive_detector_actors():  # the cluster reaps the dead driver's actors and tasks
        assert time.monotonic() < deadline
        time.sleep(0.2)
    first_run = read_output(output).num_rows
    assert 0 < first_run < len(expected), "the kill must interrupt the job part-way"
    fs, root = filesystem_for(output)
    assert not fs.exists(f"{root}/_SUCCESS.json")
    assert "has no _SUCCESS.json" in (incomplete_warning(output) or "")

    summary = main(parse_config(argv))  # the killed run's lease is taken over: its process is gone

    assert summary.skipped == first_run and summary.images == len(expected) - first_run
    _assert_each_once(output, expected)
    fs.invalidate_cache()
    assert fs.exists(f"{root}/_SUCCESS.json") and incomplete_warning(output) is None
    again = main(parse_config(argv))
    assert (again.images, again.skipped) == (0, len(expected))


def test_a_second_run_on_the_same_output_is_refused_and_nothing_is_duplicated(
    ray_cluster, tmp_path, s3_bucket, tiny_checkpoint, capsys
):
    inputs, output, expected = _write_images("s3", tmp_path, s3_bucket, 40)
    argv = _slow_run(inputs, output, tiny_checkpoint)
    job = _start_job(argv, ray_cluster, tmp_path / "job.log")
    try:
        _wait_for(lambda: _output_files(output), job, tmp_path / "job.log", "a first output file")
        assert run(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"annotate: error: {output} is being written by annotate run")
        assert job.wait(timeout=300) == 0, (tmp_path / "job.log").read_text()[-2000:]
    finally:
        if job.poll() is None:
            job.kill()
    _assert_each_once(output, expected)


def test_killed_actor_is_restarted_and_its_batch_retried(ray_cluster, tmp_path, tiny_checkpoint):
    expected = _write_folder(tmp_path / "images", 100)  # runs long enough to be killed mid-run late in a suite
    output = tmp_path / "out"
    args = parse_config(
        [
            str(tmp_path / "images"),
            str(output),
            "--weights",
            tiny_checkpoint,
            "--threshold",
            "0.01",
            "--min-size",
            "384",
            "--max-size",
            "512",
            "--batch-size",
            "2",
            "--rows-per-file",
            "2",
            "--actors",
            "1",
            "--cpus-per-actor",
            "1",
        ]
    )
    outcome: dict = {}
    earlier = {a["ActorID"] for a in _alive_detector_actors()}  # other tests' actors, not reaped yet
    job = threading.Thread(target=lambda: outcome.update(summary=main(args)))
    job.start()
    deadline = time.monotonic() + 180
    # This job's actor first (the state API lists every actor of the session: slow late in a
    # suite), then its first output file (a cheap glob): the kill follows that file at once, mid-run.
    new: list[dict] = []
    while not new:
        assert job.is_alive() and time.monotonic() < deadline, "job ended before its actor started"
        new = [a for a in _alive_detector_actors() if a["ActorID"] not in earlier]
    while not list(output.glob("*.parquet")):
        assert job.is_alive() and time.monotonic() < deadline, "job ended before its actor could be killed"
        time.sleep(0.05)
    victim = new[0]
    os.kill(victim["Pid"], signal.SIGKILL)
    job.join(timeout=300)

    from ray._private import state

    assert outcome["summary"].images == len(expected)
    assert state.actors()[victim["ActorID"]]["NumRestarts"] >= 1
    _assert_each_once(output, expected)


def test_defaults_annotate_the_sample_images_then_render_and_export(
    ray_cluster, tmp_path, tiny_checkpoint, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    first = main(parse_config(["--weights", tiny_checkpoint, *SMALL, "--limit", "2"]))
    started = time.time()
    summary = main(parse_config(["--weights", tiny_checkpoint, *SMALL, "--render", "2", str(tmp_path / "render")]))
    wall = time.time() - started
    samples = sorted((SAMPLE_IMAGES).glob("*.jpg"))
    assert 3 <= len(samples) <= 6
    table = read_output(str(tmp_path / "detr-ray-output"))  # the default OUTPUT, relative to the cwd
    assert sorted(table.column("uri").to_pylist()) == [f"file://{p}" for p in samples]
    assert (first.images, summary.skipped, summary.images, summary.errors) == (2, 2, len(samples) - 2, 0)
    # Start-up, from the job's start to its first annotated batch: before the run's end, and said.
    assert 0 < summary.startup_seconds < wall
    assert f"first image after {summary.startup_seconds:.1f} s" in summary.summary()
    marker = json.loads((tmp_path / "detr-ray-output" / "_SUCCESS.json").read_text())
    assert marker["startup_seconds"] == round(summary.startup_seconds, 3)
    pngs = sorted((tmp_path / "render").glob("*.png"))
    assert len(pngs) == 2
    sizes = {(r["width"], r["height"]) for r in table.to_pylist()}
    assert {Image.open(png).size for png in pngs} <= sizes

    # COCO results: image ids come from file names (here with their folder, matched by the trailing
    # path components) in an annotations file that lists all but one sample.
    listed = {p.name: 7000 + i for i, p in enumerate(samples[1:])}
    annotations = tmp_path / "instances.json"
    categories = detr.from_pretrained(tiny_checkpoint).categories
    annotations.write_text(
        json.dumps(
            {
                "images": [
                    {"id": i, "file_name": f"sample_images/{n}", "width": 1, "height": 1} for n, i in listed.items()
                ],
                "annotations": [],
                "categories": [{"id": c.id, "name": c.name} for c in categories],
            }
        )
    )
    results = tmp_path / "results.json"
    export = export_coco_results(str(tmp_path / "detr-ray-output"), str(annotations), str(results))
    per_image = {r["uri"].rsplit("/", 1)[1]: len(r["detections"]) for r in table.to_pylist()}
    assert summary.detections + first.detections == sum(per_image.values())
    assert (export.images, export.unmatched, export.errors) == (len(samples) - 1, 1, 0)
    exported = json.loads(results.read_text())
    assert len(exported) == export.detections == sum(per_image[n] for n in listed) > 0
    for name, image_id in listed.items():
        assert sum(d["image_id"] == image_id for d in exported) == per_image[name]
    from pycocotools.coco import COCO

    assert len(COCO(str(annotations)).loadRes(str(results)).anns) == len(exported)


def test_fail_on_error_stops_the_job_with_one_line(ray_cluster, tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "good.png").write_bytes(encode(Image.fromarray(scene(1)), "PNG"))
    manifest = tmp_path / "list.txt"
    manifest.write_text("images/good.png\nimages/missing.jpg\n")
    code = run(
        [
            str(manifest),
            str(tmp_path / "out"),
            "--weights",
            tiny_checkpoint,
            *SMALL,
            "--fail-on-error",
            "--cpus-per-actor",
            "1",
        ]
    )
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1
    assert error.startswith(f"annotate: error: file://{tmp_path}/images/missing.jpg: unreadable: ")
    assert error.endswith("(--fail-on-error)")


def test_unavailable_default_weights_fail_fast_with_one_line(tmp_path):
    env = dict(os.environ, DETR_RAY_CACHE=str(tmp_path / "empty-cache"))
    started = time.monotonic()
    command = [
        sys.executable,
        "-m",
        "jobs.annotate",
        "--weights",
        "detr-r50",
        str(SAMPLE_IMAGES),
        str(tmp_path / "out"),
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("annotate: error: cannot download weights from https://")
    assert time.monotonic() - started < 60
    assert not (tmp_path / "out").exists()


def test_usage_errors_are_one_line(tmp_path, tiny_checkpoint, capsys):
    assert run([str(tmp_path / "nowhere"), str(tmp_path / "out"), "--weights", tiny_checkpoint]) == 2
    assert capsys.readouterr().err == f"annotate: error: {tmp_path / 'nowhere'}: no such folder or prefix\n"
    assert run([str(tmp_path), str(tmp_path / "out"), "--weights", str(tmp_path / "none.pth")]) == 2
    assert capsys.readouterr().err.startswith("annotate: error: weights file not found:")
    assert run([str(tmp_path), str(tmp_path / "out"), "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    help_text = capsys.readouterr().out
    for flag in (
        "--weights",
        "--threshold",
        "--batch-size",
        "--actors",
        "--gpus-per-actor",
        "--precision",
        "--max-size",
        "--min-size",
        "--limit",
        "--render",
        "--fail-on-error",
        "--full-jpeg-decode",
        "--wait-for-gpus",
        "jobs.coco_export",
    ):
        assert flag in help_text
    # Fixed defaults are shown; computed ones are explained in words, not shown as "None".
    assert "(default: 0.7)" in help_text and "default: None" not in help_text


def test_gpu_that_never_joins_fails_after_the_wait_with_one_line(ray_cluster, tmp_path, tiny_checkpoint, capsys):
    """The test cluster has no GPU and no autoscaler: the wait must end in a clear error, not a hang."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 48), "red").save(images / "a.jpg")
    started = time.monotonic()
    status = run([str(images), str(tmp_path / "out"), "--weights", tiny_checkpoint, "--wait-for-gpus", "3"])
    err = capsys.readouterr().err
    assert status == 2, err
    ours = [line for line in err.splitlines() if line.startswith("annotate: ")]  # Ray logs to stderr too
    assert len(ours) == 1 and ours[0].startswith("annotate: error: no model actor started within --wait-for-gpus 3 s")
    assert time.monotonic() - started < 120
    assert not list((tmp_path / "out").rglob("*.parquet"))


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux's idle scheduling class")
def test_the_cpu_run_drives_ray_data_below_the_model_and_the_caller_keeps_its_class():
    """The write (and Ray Data's executor thread it starts) runs in the idle class; the caller's
    thread stays in its own, and an error in the write reaches the caller."""
    from jobs.annotate.pipeline import _run_below_the_model

    seen = []

    def work():
        started = threading.Thread(target=lambda: seen.append(os.sched_getscheduler(0)))  # as the executor's
        started.start()
        started.join()
        seen.append(os.sched_getscheduler(0))

    before = os.sched_getscheduler(0)
    _run_below_the_model(work)
    assert seen == [os.SCHED_IDLE, os.SCHED_IDLE]
    assert os.sched_getscheduler(0) == before

    def failing():
        raise ValueError("a write that failed")

    with pytest.raises(ValueError, match="a write that failed"):
        _run_below_the_model(failing)
