"""jobs/synthetic_shapes.py: the synthetic COCO dataset the fine-tuning tests learn from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import s3fs
from PIL import Image

from jobs.synthetic_shapes import SHAPE_CLASSES, ShapesConfig, build_parser, config_from_args, generate, main

ROOT = Path(__file__).resolve().parents[2]


def test_dataset_is_coco_with_non_coco_ids_several_objects_and_negatives(tmp_path):
    coco = generate(str(tmp_path), 60, seed=3)

    on_disk = json.loads((tmp_path / "annotations.json").read_text())
    assert on_disk == coco
    assert sorted(c["id"] for c in coco["categories"]) == [10, 20, 30]
    per_image = {im["id"]: 0 for im in coco["images"]}
    for annotation in coco["annotations"]:
        per_image[annotation["image_id"]] += 1
    counts = list(per_image.values())
    assert 0 in counts and max(counts) >= 3  # negatives and several objects per image
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    for image in coco["images"]:
        assert Image.open(tmp_path / "images" / image["file_name"]).size == (image["width"], image["height"])


def test_each_box_frames_a_shape_of_its_class_colour(tmp_path):
    coco = generate(str(tmp_path), 30, seed=5)
    colour_of = {c.category_id: np.array(c.rgb) for c in SHAPE_CLASSES}
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    for annotation in coco["annotations"]:
        pixels = np.asarray(Image.open(tmp_path / "images" / files[annotation["image_id"]]).convert("RGB")).astype(int)
        x, y, w, h = (int(v) for v in annotation["bbox"])
        assert 0 <= x and 0 <= y and x + w <= pixels.shape[1] and y + h <= pixels.shape[0]
        # Below the centre is inside every shape (the triangle's apex is at the top), unless a later shape covers it.
        centre = pixels[y + h * 2 // 3, x + w // 2]
        nearest = min(colour_of, key=lambda cid: np.abs(colour_of[cid] - centre).sum())
        overlapped = any(
            other is not annotation and other["image_id"] == annotation["image_id"] for other in coco["annotations"]
        )
        assert nearest == annotation["category_id"] or overlapped


def test_same_seed_same_dataset_other_seed_other(tmp_path):
    a = generate(str(tmp_path / "a"), 8, seed=1)
    b = generate(str(tmp_path / "b"), 8, seed=1)
    c = generate(str(tmp_path / "c"), 8, seed=2)
    assert a == b and a != c
    assert (tmp_path / "a/images/000001.png").read_bytes() == (tmp_path / "b/images/000001.png").read_bytes()


def test_cli_writes_to_object_storage(s3_bucket):
    coco = main(
        config_from_args(
            build_parser().parse_args(
                [
                    f"s3://{s3_bucket}/shapes",
                    "--images",
                    "5",
                    "--seed",
                    "0",
                    "--image-size",
                    "64",
                    "--min-object-size",
                    "16",
                    "--max-object-size",
                    "32",
                ]
            )
        )
    ).coco
    fs = s3fs.S3FileSystem()
    assert sorted(fs.ls(f"{s3_bucket}/shapes/images")) == [
        f"{s3_bucket}/shapes/images/{i:06d}.png" for i in range(1, 6)
    ]
    assert json.loads(fs.cat(f"{s3_bucket}/shapes/annotations.json")) == coco


def test_module_runs_from_the_command_line_and_rejects_bad_sizes(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "jobs.synthetic_shapes", str(tmp_path / "s"), "--images", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and (tmp_path / "s/annotations.json").is_file(), ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "jobs.synthetic_shapes", str(tmp_path / "t"), "--max-object-size", "999"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "max_object_size" in bad.stderr
    with pytest.raises(ValueError, match="num_images"):
        generate(str(tmp_path / "u"), 0)
    with pytest.raises(ValueError, match="empty_fraction"):
        ShapesConfig(empty_fraction=1.0)
