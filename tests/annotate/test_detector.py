"""jobs/annotate/detector.py: the model stage, its aspect grouping and its heap trimming."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from PIL import Image

import detr
from coco import DETECTIONS_SCHEMA
from jobs.annotate.decoding import prepare_images
from jobs.annotate.detector import Detector, DetectorConfig, HeapTrimmer, aspect_groups

from checkpoints import tiny_config, write_decisive_checkpoint
from detection_checks import assert_close_detections, assert_same_detections, direct_detections
from images import encode, scene


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

    assert out.schema.equals(DETECTIONS_SCHEMA) and out.column("uri").to_pylist() == uris
    for row, data in zip(out.to_pylist(), objects.values()):
        if row["uri"].endswith("bad.jpg"):
            assert (row["error"], row["detections"], row["width"]) == ("not an image", [], None)
        else:
            assert_same_detections(row["detections"], direct_detections(model, data))
    half = Detector(DetectorConfig(weights=tiny_checkpoint, threshold=0.01, precision="bf16"))(prepared)
    assert half.schema.equals(DETECTIONS_SCHEMA) and half.column("error").to_pylist() == out.column("error").to_pylist()
    assert half.column("model").to_pylist() == [model.weights_name] * len(uris)


def test_detector_reports_its_first_batch_once(tiny_checkpoint, tmp_path):
    (tmp_path / "a.jpg").write_bytes(encode(Image.fromarray(scene(0)), "JPEG"))
    prepared = prepare_images(pa.table({"uri": [f"file://{tmp_path}/a.jpg"]}), min_size=64, max_size=96)
    reported: list[float] = []
    threads = torch.get_num_threads()
    try:
        detector = Detector(DetectorConfig(weights=tiny_checkpoint, cpu_threads=1), on_first_batch=reported.append)
        assert torch.get_num_threads() == 1, "the thread count is set explicitly, whatever OMP_NUM_THREADS says"
        before = time.time()
        detector(prepared)
        after = time.time()
        detector(prepared)
    finally:
        torch.set_num_threads(threads)
    assert len(reported) == 1 and before <= reported[0] <= after


def test_detector_runs_the_model_on_one_thread_of_its_own(tiny_checkpoint, tmp_path):
    """Ray constructs an actor on one thread and calls it from others; OpenMP would give each
    caller a team of threads of its own (and libgomp, managing more threads than cores, would stop
    spinning at barriers)."""
    (tmp_path / "a.jpg").write_bytes(encode(Image.fromarray(scene(0)), "JPEG"))
    prepared = prepare_images(pa.table({"uri": [f"file://{tmp_path}/a.jpg"]}), min_size=64, max_size=96)
    threads = torch.get_num_threads()
    detector = Detector(DetectorConfig(weights=tiny_checkpoint, cpu_threads=threads))
    forwards: list[tuple[int, int]] = []  # (thread, torch threads) of each forward pass
    detector.model.register_forward_pre_hook(
        lambda module, inputs: forwards.append((threading.get_ident(), torch.get_num_threads()))
    )
    callers = [threading.Thread(target=detector, args=(prepared,)) for _ in range(2)]
    for caller in callers:
        caller.start()
        caller.join()
    detector(prepared)

    assert len(forwards) == 3 and len({thread for thread, _ in forwards}) == 1
    assert forwards[0][0] not in {threading.get_ident(), *(caller.ident for caller in callers)}
    assert {count for _, count in forwards} == {threads}


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


# What each precision can honestly give against fp32 on the CPU, for DETR-R50 on real photos: the relative
# error of the logits (||got - want|| / ||want||), the largest error of a normalized cxcywh box coordinate,
# and of a detection's score. bf16 keeps 8 significant bits, so ~1e-2 after R50 and 12 transformer layers
# (CPU bf16 autocast measured 8e-3 on the logits, 4e-3 on the boxes, 3e-2 on a score at a softmax's steep
# part); fp16 keeps 11; fp32 on a GPU runs cuDNN's convolutions in TF32 (11 bits) by PyTorch's default.
GPU_TOLERANCE = {
    "fp32": {"logits": 5e-3, "boxes": 2e-3, "scores": 1e-2},
    "fp16": {"logits": 1e-2, "boxes": 5e-3, "scores": 3e-2},
    "bf16": {"logits": 3e-2, "boxes": 1e-2, "scores": 5e-2},
}
SAMPLE_PHOTOS = Path(__file__).resolve().parents[2] / "jobs" / "annotate" / "sample_images"


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float().cpu() - want.float()).norm() / want.float().norm()).item()


def compare_with_cpu_fp32(weights: str, prepared: pa.Table, precision: str, use_gpu: bool) -> dict[str, float]:
    """Run the Detector (``precision``, on the GPU if ``use_gpu``) and the fp32 CPU Detector on the same
    prepared batch; check the rows and the raw outputs against :data:`GPU_TOLERANCE`. Returns the errors."""
    tolerance = GPU_TOLERANCE[precision]
    threshold = 0.7
    reference = Detector(DetectorConfig(weights=weights, threshold=threshold, precision="fp32"))
    detector = Detector(DetectorConfig(weights=weights, threshold=threshold, precision=precision, use_gpu=use_gpu))
    # The model's outputs on one padded batch of every image.
    ok = [i for i, error in enumerate(prepared.column("error").to_pylist()) if error is None]
    rows = prepared.take(ok).to_pylist()
    images = [
        torch.frombuffer(bytearray(r["pixels"]), dtype=torch.uint8).reshape(3, r["resized_height"], r["resized_width"])
        for r in rows
    ]
    batch = detr.collate(images, [(r["height"], r["width"]) for r in rows])
    with torch.inference_mode():
        want = reference.model(batch.pixel_values, batch.pixel_mask)
        with torch.autocast(detector.device.type, dtype=detector.dtype, enabled=detector.dtype != torch.float32):
            got = detector.model(batch.pixel_values.to(detector.device), batch.pixel_mask.to(detector.device))
    errors = {
        "logits": relative_error(got["pred_logits"], want["pred_logits"]),
        "boxes": (got["pred_boxes"].float().cpu() - want["pred_boxes"]).abs().max().item(),
    }
    assert errors["logits"] < tolerance["logits"] and errors["boxes"] < tolerance["boxes"], errors
    assert torch.isfinite(got["pred_logits"]).all() and torch.isfinite(got["pred_boxes"]).all()
    # The job's rows: same images and errors, the same detections within the tolerance.
    expected, actual = reference(prepared).to_pylist(), detector(prepared).to_pylist()
    matched = 0
    for want_row, got_row in zip(expected, actual):
        assert {k: v for k, v in got_row.items() if k != "detections"} == {
            k: v for k, v in want_row.items() if k != "detections"
        }
        box_tol_px = tolerance["boxes"] * max(want_row["width"] or 0, want_row["height"] or 0)
        matched += assert_close_detections(
            got_row["detections"],
            want_row["detections"],
            threshold=threshold,
            score_tol=tolerance["scores"],
            box_tol_px=box_tol_px,
        )
    assert matched >= len(ok), "too few detections to compare"
    return errors


def test_bf16_detector_on_cpu_stays_within_the_stated_tolerance(tmp_path):
    """The comparison the GPU tests make, here on the CPU (bf16 autocast), with a small model."""
    weights = write_decisive_checkpoint(str(tmp_path / "tiny.pth"), tiny_config())
    photos = sorted(SAMPLE_PHOTOS.glob("*.jpg"))
    prepared = prepare_images(pa.table({"uri": [f"file://{p}" for p in photos]}), min_size=96, max_size=160)
    errors = compare_with_cpu_fp32(weights, prepared, "bf16", use_gpu=False)
    assert errors["logits"] > 0, "bf16 autocast ran"


@pytest.fixture(scope="module")
def r50_photos(tmp_path_factory) -> tuple[str, pa.Table]:
    """A decisive random-weight DETR-R50 and the six sample photos prepared at 480/800, with a bad file."""
    folder = tmp_path_factory.mktemp("gpu")
    weights = write_decisive_checkpoint(str(folder / "r50.pth"), detr.DetrConfig())
    (folder / "bad.jpg").write_bytes(b"not an image")
    uris = [f"file://{p}" for p in sorted(SAMPLE_PHOTOS.glob("*.jpg"))] + [f"file://{folder}/bad.jpg"]
    return weights, prepare_images(pa.table({"uri": uris}), min_size=480, max_size=800)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_gpu_detector_gives_the_cpu_detections(r50_photos, precision):
    errors = compare_with_cpu_fp32(*r50_photos, precision, use_gpu=True)
    print(f"{precision} on {torch.cuda.get_device_name()} vs fp32 CPU: {errors}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_model_without_tf32_computes_the_cpus_function(r50_photos):
    """With TF32 off, fp32 on the GPU is the same function as on the CPU up to fp32 rounding."""
    weights, prepared = r50_photos
    model = detr.from_pretrained(weights)
    rows = prepared.filter(pc.is_null(prepared.column("error"))).to_pylist()
    images = [
        torch.frombuffer(bytearray(r["pixels"]), dtype=torch.uint8).reshape(3, r["resized_height"], r["resized_width"])
        for r in rows
    ]
    batch = detr.collate(images, [(r["height"], r["width"]) for r in rows])
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            want = model(batch.pixel_values, batch.pixel_mask)
            gpu = model.to("cuda")
            got = gpu(batch.pixel_values.cuda(), batch.pixel_mask.cuda())
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert relative_error(got["pred_logits"], want["pred_logits"]) < 1e-4
    assert (got["pred_boxes"].cpu() - want["pred_boxes"]).abs().max().item() < 1e-4
