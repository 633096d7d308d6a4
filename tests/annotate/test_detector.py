"""jobs/annotate/detector.py: the model stage, its aspect grouping and its heap trimming."""

from __future__ import annotations

import sys
import time

import pyarrow as pa
import pytest
import torch
from PIL import Image

import detr
from coco import DETECTIONS_SCHEMA
from jobs.annotate.decoding import prepare_images
from jobs.annotate.detector import Detector, DetectorConfig, HeapTrimmer, aspect_groups

from detection_checks import assert_same_detections, direct_detections
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
