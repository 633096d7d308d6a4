"""jobs/annotate.py end to end on a local Ray cluster: a real S3 server, real kills, real Parquet.

Runs use the tiny random checkpoint, small images and a low threshold (random weights score
low) so every Ray run takes seconds.
"""

from __future__ import annotations

import io
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
import torch
from PIL import Image

import detr
from jobs.actor_plan import ActorPlanError, parse_actors, plan_actors
from jobs.annotate import main, parse_args, run_cli
from jobs.coco_export import CocoExportError, export_coco_results
from jobs.detector import OUTPUT_SCHEMA, Detector, DetectorConfig, HeapTrimmer, aspect_groups
from jobs.image_decoding import decode_image, prepare_images
from jobs.image_source import filesystem_for

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--min-size", "128", "--max-size", "192", "--threshold", "0.01"]


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def scene(seed: int, height: int = 64, width: int = 96) -> np.ndarray:
    """A noisy background with a few flat rectangles, different per seed."""
    rng = np.random.default_rng(seed)
    image = (rng.random((height, width, 3)) * 80).astype(np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, height - 16), rng.integers(0, width - 16)
        image[y : y + 16, x : x + 24] = rng.integers(60, 255, 3)
    return image


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
        "broken/truncated.jpg": "truncated JPEG", "broken/zero-bytes.jpg": "empty file",
        "broken/text.jpg": "not an image", "broken/bomb.png": "decompression bomb: 15000x10000",
    }
    return objects, reasons


def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def read_output(uri: str) -> pa.Table:
    fs, root = filesystem_for(uri)
    tables = []
    for path in sorted(p for p in fs.find(root) if p.endswith(".parquet")):
        with fs.open(path, "rb") as stream:
            tables.append(pq.read_table(stream))
    return pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table()


def direct_detections(model, data: bytes, threshold: float = 0.01) -> list[dict]:
    """The model called directly on one image, with the job's decoding and resize rule."""
    batch = detr.preprocess([decode_image(data)], 128, 192)
    with torch.inference_mode():
        outputs = model(batch.pixel_values, batch.pixel_mask)
    return detr.detection_records(detr.postprocess(outputs, batch.original_sizes, threshold)[0], model.categories)


def assert_same_detections(actual: list[dict], expected: list[dict]) -> None:
    assert len(actual) == len(expected)
    unmatched = list(actual)
    for want in expected:
        match = next(
            (got for got in unmatched
             if got["category_id"] == want["category_id"] and abs(got["score"] - want["score"]) < 1e-4
             and np.allclose(got["box"], want["box"], rtol=1e-4, atol=1e-3)),
            None,
        )
        assert match is not None, f"no match for {want}"
        unmatched.remove(match)


def test_s3_archive_of_mixed_formats(ray_cluster, s3_bucket, tiny_checkpoint):
    objects, reasons = mixed_archive()
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.pipe({f"{s3_bucket}/archive/{name}": data for name, data in objects.items()})
    output = f"s3://{s3_bucket}/detections"

    summary = main(parse_args([f"s3://{s3_bucket}/archive", output, "--weights", tiny_checkpoint, *SMALL,
                               "--actors", "2", "--cpus-per-actor", "1", "--batch-size", "4"]))

    table = read_output(output)
    assert table.schema.equals(OUTPUT_SCHEMA)  # the exact Arrow schema, not just the names
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


def _assert_each_once(output: Path, expected: list[str]) -> None:
    uris = read_output(str(output)).column("uri").to_pylist()
    assert len(uris) == len(set(uris)), "duplicate rows"
    assert sorted(uris) == expected, "missing rows"


def test_killed_job_resumes_with_every_image_exactly_once(ray_cluster, tmp_path, tiny_checkpoint):
    expected = _write_folder(tmp_path / "images", 80)
    output = tmp_path / "out"
    argv = [str(tmp_path / "images"), str(output), "--weights", tiny_checkpoint, "--threshold", "0.01",
            "--min-size", "384", "--max-size", "512", "--batch-size", "2", "--rows-per-file", "2",
            "--actors", "1", "--cpus-per-actor", "1"]
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    with open(tmp_path / "job.log", "wb") as log:
        job = subprocess.Popen([sys.executable, "-m", "jobs.annotate", *argv], cwd=ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while len(list(output.glob("*.parquet"))) < 3:
                log_tail = (tmp_path / "job.log").read_text()[-2000:]
                assert job.poll() is None, f"job ended before it could be killed:\n{log_tail}"
                assert time.monotonic() < deadline, "no output files after 180 s"
                time.sleep(0.05)
        finally:
            job.send_signal(signal.SIGKILL)  # the driver, as a preempted head node would lose it
            job.wait()
    deadline = time.monotonic() + 60
    while _alive_detector_actors():  # the cluster reaps the dead driver's actors and tasks
        assert time.monotonic() < deadline
        time.sleep(0.2)
    first_run = read_output(str(output)).num_rows
    assert 0 < first_run < len(expected), "the kill must interrupt the job part-way"

    summary = main(parse_args(argv))

    assert summary.skipped == first_run and summary.images == len(expected) - first_run
    _assert_each_once(output, expected)


def test_killed_actor_is_restarted_and_its_batch_retried(ray_cluster, tmp_path, tiny_checkpoint):
    expected = _write_folder(tmp_path / "images", 60)
    output = tmp_path / "out"
    args = parse_args([str(tmp_path / "images"), str(output), "--weights", tiny_checkpoint, "--threshold", "0.01",
                       "--min-size", "384", "--max-size", "512", "--batch-size", "2", "--rows-per-file", "2",
                       "--actors", "1", "--cpus-per-actor", "1"])
    outcome: dict = {}
    job = threading.Thread(target=lambda: outcome.update(summary=main(args)))
    job.start()
    deadline = time.monotonic() + 180
    while not (list(output.glob("*.parquet")) and _alive_detector_actors()):
        assert job.is_alive() and time.monotonic() < deadline, "job ended before its actor could be killed"
        time.sleep(0.05)
    victim = _alive_detector_actors()[0]
    os.kill(victim["Pid"], signal.SIGKILL)
    job.join(timeout=300)

    from ray._private import state

    assert outcome["summary"].images == len(expected)
    assert state.actors()[victim["ActorID"]]["NumRestarts"] >= 1
    _assert_each_once(output, expected)


def test_defaults_annotate_the_sample_images_then_render_and_export(ray_cluster, tmp_path, tiny_checkpoint,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = main(parse_args(["--weights", tiny_checkpoint, *SMALL, "--limit", "2"]))
    summary = main(parse_args(["--weights", tiny_checkpoint, *SMALL, "--render", "2", str(tmp_path / "render")]))
    samples = sorted((ROOT / "jobs" / "sample_images").glob("*.jpg"))
    assert 3 <= len(samples) <= 6
    table = read_output(str(tmp_path / "detr-ray-output"))  # the default OUTPUT, relative to the cwd
    assert sorted(table.column("uri").to_pylist()) == [f"file://{p}" for p in samples]
    assert (first.images, summary.skipped, summary.images, summary.errors) == (2, 2, len(samples) - 2, 0)
    pngs = sorted((tmp_path / "render").glob("*.png"))
    assert len(pngs) == 2
    sizes = {(r["width"], r["height"]) for r in table.to_pylist()}
    assert {Image.open(png).size for png in pngs} <= sizes

    # COCO results: image ids come from file names in an annotations file that lists all but one sample.
    listed = {p.name: 7000 + i for i, p in enumerate(samples[1:])}
    annotations = tmp_path / "instances.json"
    categories = detr.from_pretrained(tiny_checkpoint).categories
    annotations.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"val2017/{n}", "width": 1, "height": 1} for n, i in listed.items()],
        "annotations": [], "categories": [{"id": c.id, "name": c.name} for c in categories],
    }))
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


def test_coco_export_matches_real_coco_file_names(tmp_path, coco_mini):
    annotations = coco_mini / "annotations" / "instances_val2017.json"
    images = json.loads(annotations.read_text())["images"][:3]
    detection = {"category_id": 18, "label": "dog", "score": 0.9, "box": [10.0, 20.0, 110.0, 70.0]}
    ok = {"width": 1, "height": 1, "error": None, "model": "m"}
    rows = [
        {"uri": f"s3://bucket/a/{images[0]['file_name']}", "detections": [detection], **ok},
        {"uri": f"s3://bucket/b/{images[1]['file_name']}", "detections": [detection, detection], **ok},
        {"uri": f"s3://bucket/c/{images[2]['file_name']}", "width": None, "height": None, "detections": [],
         "error": "truncated JPEG", "model": "m"},
        {"uri": "s3://bucket/d/not-coco.jpg", "detections": [detection], **ok},
    ]
    (tmp_path / "out").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), tmp_path / "out" / "part.parquet")
    results = tmp_path / "results.json"
    export = export_coco_results(str(tmp_path / "out"), str(annotations), str(results))
    assert (export.images, export.unmatched, export.errors, export.detections) == (2, 1, 1, 3)
    exported = json.loads(results.read_text())
    assert [d["image_id"] for d in exported] == [images[0]["id"], images[1]["id"], images[1]["id"]]
    assert exported[0]["bbox"] == [10.0, 20.0, 100.0, 50.0] and exported[0]["category_id"] == 18
    from pycocotools.coco import COCO

    assert len(COCO(str(annotations)).loadRes(str(results)).anns) == 3
    rows.append(dict(rows[0], uri=f"s3://bucket/elsewhere/{images[0]['file_name']}"))
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), tmp_path / "out" / "part.parquet")
    with pytest.raises(CocoExportError, match=f"both match COCO file name '{images[0]['file_name']}'"):
        export_coco_results(str(tmp_path / "out"), str(annotations), str(results))
    with pytest.raises(CocoExportError, match=r"missing\.json: no such file"):
        export_coco_results(str(tmp_path / "out"), str(tmp_path / "missing.json"), str(results))


def test_fail_on_error_stops_the_job_with_one_line(ray_cluster, tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "good.png").write_bytes(encode(Image.fromarray(scene(1)), "PNG"))
    manifest = tmp_path / "list.txt"
    manifest.write_text("images/good.png\nimages/missing.jpg\n")
    code = run_cli([str(manifest), str(tmp_path / "out"), "--weights", tiny_checkpoint, *SMALL, "--fail-on-error",
                    "--cpus-per-actor", "1"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1
    assert error.startswith(f"annotate: error: file://{tmp_path}/images/missing.jpg: unreadable: ")
    assert error.endswith("(--fail-on-error)")


def test_unavailable_default_weights_fail_fast_with_one_line(tmp_path):
    env = dict(os.environ, DETR_RAY_CACHE=str(tmp_path / "empty-cache"))
    started = time.monotonic()
    command = [sys.executable, "-m", "jobs.annotate", "--weights", "detr-r50", str(ROOT / "jobs" / "sample_images"),
               str(tmp_path / "out")]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("annotate: error: cannot download weights from https://")
    assert time.monotonic() - started < 60
    assert not (tmp_path / "out").exists()


def test_usage_errors_are_one_line(tmp_path, tiny_checkpoint, capsys):
    assert run_cli([str(tmp_path / "nowhere"), str(tmp_path / "out"), "--weights", tiny_checkpoint]) == 2
    assert capsys.readouterr().err == f"annotate: error: {tmp_path / 'nowhere'}: no such folder or prefix\n"
    assert run_cli([str(tmp_path), str(tmp_path / "out"), "--weights", str(tmp_path / "none.pth")]) == 2
    assert capsys.readouterr().err.startswith("annotate: error: weights file not found:")
    assert run_cli([str(tmp_path), str(tmp_path / "out"), "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = capsys.readouterr().out
    for flag in ("--weights", "--threshold", "--batch-size", "--actors", "--gpus-per-actor", "--precision",
                 "--max-size", "--min-size", "--limit", "--render", "--fail-on-error", "--full-jpeg-decode",
                 "--wait-for-gpus", "jobs.coco_export"):
        assert flag in help_text
    # Fixed defaults are shown; computed ones are explained in words, not shown as "None".
    assert "(default: 0.7)" in help_text and "default: None" not in help_text


def test_detector_batches_equal_single_image_calls(tiny_checkpoint, tmp_path):
    objects = {f"land{i}.jpg": encode(Image.fromarray(scene(i)), "JPEG") for i in range(3)}
    objects |= {f"port{i}.png": encode(Image.fromarray(scene(10 + i, 96, 64)), "PNG") for i in range(2)}
    objects["bad.jpg"] = b"not an image"
    for name, data in objects.items():
        (tmp_path / name).write_bytes(data)
    uris = [f"file://{tmp_path}/{name}" for name in objects]
    prepared = prepare_images(pa.table({"uri": uris}), min_size=128, max_size=192)
    model = detr.from_pretrained(tiny_checkpoint)

    out = Detector(DetectorConfig(weights=tiny_checkpoint, threshold=0.01))(prepared)  # one call, two aspect groups

    assert out.schema.equals(OUTPUT_SCHEMA) and out.column("uri").to_pylist() == uris
    for row, data in zip(out.to_pylist(), objects.values()):
        if row["uri"].endswith("bad.jpg"):
            assert (row["error"], row["detections"], row["width"]) == ("not an image", [], None)
        else:
            assert_same_detections(row["detections"], direct_detections(model, data))
    half = Detector(DetectorConfig(weights=tiny_checkpoint, threshold=0.01, precision="bf16"))(prepared)
    assert half.schema.equals(OUTPUT_SCHEMA) and half.column("error").to_pylist() == out.column("error").to_pylist()
    assert half.column("model").to_pylist() == [model.weights_name] * len(uris)


def _nodes(*resources: dict) -> list[dict]:
    return [{"Alive": True, "Resources": r} for r in resources]


def test_actor_plan_defaults_fit_the_cluster():
    defaults = parse_args([])
    cpu = plan_actors(defaults, _nodes({"CPU": 2.0}))
    assert (cpu.min_actors, cpu.max_actors, cpu.cpus_per_actor, cpu.gpus_per_actor) == (1, 1, 1.0, 0.0)
    gpu = plan_actors(defaults, _nodes({"CPU": 16.0, "GPU": 4.0}, {"CPU": 16.0, "GPU": 4.0}))
    assert (gpu.min_actors, gpu.max_actors, gpu.cpus_per_actor, gpu.gpus_per_actor) == (8, 8, 1.0, 1.0)
    assert gpu.batch_size == 16
    scaled = plan_actors(parse_args(["--actors", "2,6", "--gpus-per-actor", "0.5"]), _nodes({"CPU": 8.0, "GPU": 1.0}))
    assert (scaled.min_actors, scaled.max_actors, scaled.gpus_per_actor) == (2, 6, 0.5)
    assert parse_actors("3") == (3, 3)
    with pytest.raises(ActorPlanError, match="--actors '4,2': expected N or MIN,MAX"):
        parse_actors("4,2")
    with pytest.raises(ActorPlanError, match="leave none of the cluster's 2 CPUs"):
        plan_actors(parse_args(["--actors", "2", "--cpus-per-actor", "1"]), _nodes({"CPU": 2.0}))
    with pytest.raises(ActorPlanError, match="--gpus-per-actor 1: no node"):
        plan_actors(parse_args(["--gpus-per-actor", "1"]), _nodes({"CPU": 2.0}))
    assert plan_actors(defaults, _nodes({"CPU": 2.0})).wait_for_actors_s == 0


def test_gpu_actors_may_wait_for_an_autoscaler_to_add_gpu_nodes():
    # A KubeRay cluster whose GPU group starts at zero replicas: only the head (no CPUs for tasks) is up.
    head_only = _nodes({"CPU": 0.0})
    plan = plan_actors(parse_args(["--wait-for-gpus", "900", "--actors", "1,4"]), head_only)
    assert (plan.gpus_per_actor, plan.cpus_per_actor, plan.min_actors, plan.max_actors) == (1.0, 1.0, 1, 4)
    assert plan.wait_for_actors_s == 900 and plan.batch_size == 16
    with pytest.raises(ActorPlanError, match="pass --wait-for-gpus SECONDS"):
        plan_actors(parse_args(["--gpus-per-actor", "1"]), head_only)
    # Asked for CPU inference, nothing waits.
    cpu = plan_actors(parse_args(["--wait-for-gpus", "900", "--gpus-per-actor", "0"]), _nodes({"CPU": 4.0}))
    assert cpu.wait_for_actors_s == 0 and cpu.gpus_per_actor == 0


def test_gpu_that_never_joins_fails_after_the_wait_with_one_line(ray_cluster, tmp_path, tiny_checkpoint, capsys):
    """The test cluster has no GPU and no autoscaler: the wait must end in a clear error, not a hang."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 48), "red").save(images / "a.jpg")
    started = time.monotonic()
    status = run_cli([str(images), str(tmp_path / "out"), "--weights", tiny_checkpoint, "--wait-for-gpus", "3"])
    err = capsys.readouterr().err
    assert status == 2, err
    ours = [line for line in err.splitlines() if line.startswith("annotate: ")]  # Ray logs to stderr too
    assert len(ours) == 1 and ours[0].startswith("annotate: error: no model actor started within --wait-for-gpus 3 s")
    assert time.monotonic() - started < 120
    assert not list((tmp_path / "out").rglob("*.parquet"))


def test_aspect_groups_keep_orientations_apart():
    shapes = [(800, 1066), (1066, 800), (800, 1200), (1066, 800), (800, 1066)]
    groups = aspect_groups(shapes)
    assert sorted(i for g in groups for i in g) == list(range(5))
    assert sorted(sorted(g) for g in groups) == [[0, 2, 4], [1, 3]]
    assert aspect_groups([(100, 100)] * 3) == [[0, 1, 2]]


def test_heap_is_trimmed_only_after_growing_past_the_allowance():
    resident = [1000]
    trimmed = []
    trimmer = HeapTrimmer(slack_bytes=100, resident_bytes=lambda: resident[0], trim=lambda: trimmed.append(resident[0]))
    trimmer()  # the first batch sets the baseline
    resident[0] = 1100
    trimmer()  # grown by exactly the allowance: no trim
    resident[0] = 1101
    trimmer()
    assert trimmed == [1000, 1101]
    resident[0] = 1150
    trimmer()
    assert trimmer.trims == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_heap_trimmer_trims_this_process_for_real():
    trimmer = HeapTrimmer()
    garbage = [bytes(1000) for _ in range(100_000)]  # ~100 MB of small heap blocks, then freed
    del garbage
    trimmer()
    trimmer()  # no growth since: no second trim
    assert trimmer.trims == 1
