"""The vectorized evaluator against pycocotools' COCOeval (the reference), to 1e-9."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from coco.annotations import parse_instances
from coco.evaluation import (
    STAT_NAMES,
    DetectionBoxes,
    box_iou_xywh,
    evaluate_boxes,
    format_stats,
)

from conftest import COCO_MINI

COCO_MINI_VAL = COCO_MINI / "annotations" / "instances_val2017.json"


def pycocotools_eval(ground_truth: dict, results: list[dict], image_ids: list[int] | None = None) -> COCOeval:
    """pycocotools' bbox evaluation of ``results`` on ``image_ids`` (all ground-truth images when None)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(ground_truth)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def detections_from_results(results: list[dict]) -> DetectionBoxes:
    return DetectionBoxes(
        image_ids=np.array([r["image_id"] for r in results], dtype=np.int64),
        category_ids=np.array([r["category_id"] for r in results], dtype=np.int64),
        boxes_xywh=np.array([r["bbox"] for r in results], dtype=np.float64).reshape(-1, 4),
        scores=np.array([r["score"] for r in results], dtype=np.float64),
    )


def synthesize(seed: int, num_images: int = 250, num_categories: int = 25) -> tuple[dict, list[dict]]:
    """Ground truth and results exercising the evaluator's corner cases.

    Crowd regions, images without annotations, categories without annotations, duplicate
    ground-truth boxes (IoU ties), integer boxes (IoUs exactly at thresholds), quantized
    scores (score ties within and across images), more than 100 detections in one
    (image, category), an annotation with id 0, and ``area`` fields that differ from the box.
    """
    rng = np.random.default_rng(seed)
    category_ids = sorted(rng.choice(np.arange(1, 4 * num_categories), num_categories, replace=False).tolist())
    annotated_categories = category_ids[:-2]  # the last two categories have no ground truth
    images, annotations, results = [], [], []
    for index in range(num_images):
        image_id = int(10 * index + rng.integers(1, 9))
        width, height = int(rng.integers(200, 700)), int(rng.integers(200, 700))
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": width, "height": height})
        boxes = []
        for _ in range(0 if rng.random() < 0.1 else int(rng.poisson(6))):
            w = float(np.round(np.exp(rng.uniform(np.log(3), np.log(width * 0.9)))))
            h = float(np.round(np.exp(rng.uniform(np.log(3), np.log(height * 0.9)))))
            x, y = float(rng.integers(0, width - w + 1)), float(rng.integers(0, height - h + 1))
            category = int(rng.choice(annotated_categories[: max(3, len(annotated_categories) // (1 + index % 3))]))
            copies = 2 if rng.random() < 0.05 else 1  # duplicated boxes make IoU ties
            for _ in range(copies):
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": category,
                        "bbox": [x, y, w, h],
                        "area": w * h * float(rng.uniform(0.5, 1.0)),
                        "iscrowd": int(rng.random() < 0.05),
                    }
                )
            boxes.append((x, y, w, h, category))
        for rank in range(int(rng.integers(0, 60))):
            if boxes and rank < 3 * len(boxes):
                x, y, w, h, category = boxes[rank % len(boxes)]
                if rng.random() < 0.5:  # integer jitter: exact IoUs such as 0.5 or 0.75
                    x, y = x + float(rng.integers(-2, 3)), y + float(rng.integers(-2, 3))
                    w, h = max(1.0, w + float(rng.integers(-3, 4))), max(1.0, h + float(rng.integers(-3, 4)))
                else:
                    jitter = rng.normal(0, 0.08, 4)
                    x, y = x + jitter[0] * w, y + jitter[1] * h
                    w, h = w * float(np.exp(jitter[2])), h * float(np.exp(jitter[3]))
                if rng.random() < 0.1:
                    category = int(rng.choice(category_ids))
            else:
                w, h = float(rng.uniform(2, width / 2)), float(rng.uniform(2, height / 2))
                x, y = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
                category = int(rng.choice(category_ids))
            score = float(np.round(rng.random() * 20) / 20)  # quantized: many ties
            results.append({"image_id": image_id, "category_id": category, "bbox": [x, y, w, h], "score": score})
    # One crowded (image, category): more than maxDets=100 detections.
    crowded = images[1]
    for _ in range(130):
        x, y = float(rng.uniform(0, 100)), float(rng.uniform(0, 100))
        results.append(
            {
                "image_id": crowded["id"],
                "category_id": category_ids[0],
                "bbox": [x, y, 40.0, 40.0],
                "score": float(rng.random()),
            }
        )
    annotations[0]["id"] = 0  # pycocotools stores a match to annotation id 0 as "no match"
    categories = [{"id": c, "name": f"category-{c}", "supercategory": "thing"} for c in category_ids]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def assert_equal_to_pycocotools(ground_truth: dict, results: list[dict], image_ids: list[int] | None = None) -> None:
    reference = pycocotools_eval(ground_truth, results, image_ids)
    gt = parse_instances("ground-truth", ground_truth)
    scored = gt.image_ids if image_ids is None else np.array(image_ids)
    ours = evaluate_boxes(gt.boxes, detections_from_results(results), scored, gt.category_ids)
    np.testing.assert_allclose([ours.stats[name] for name in STAT_NAMES], reference.stats, rtol=0, atol=1e-9)
    np.testing.assert_allclose(ours.precision, reference.eval["precision"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(ours.recall, reference.eval["recall"], rtol=0, atol=1e-9)
    # Per-category AP, the way pycocotools' summarize would average one category's slice.
    precision = reference.eval["precision"][:, :, :, 0, -1]
    for k in range(precision.shape[2]):
        valid = precision[:, :, k][precision[:, :, k] > -1]
        expected = np.mean(valid) if valid.size else np.nan
        np.testing.assert_allclose(ours.category_ap()[k], expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_equals_pycocotools(seed: int) -> None:
    ground_truth, results = synthesize(seed)
    assert any(a["iscrowd"] for a in ground_truth["annotations"])
    assert_equal_to_pycocotools(ground_truth, results)


def test_synthetic_subset_of_images_equals_pycocotools() -> None:
    ground_truth, results = synthesize(seed=3, num_images=120)
    image_ids = [image["id"] for image in ground_truth["images"][::3]]
    assert_equal_to_pycocotools(ground_truth, results, image_ids)


def test_stats_are_not_trivial() -> None:
    """Guards the comparison: the synthetic case yields mid-range, distinct stats."""
    ground_truth, results = synthesize(seed=0)
    gt = parse_instances("ground-truth", ground_truth)
    stats = evaluate_boxes(gt.boxes, detections_from_results(results), gt.image_ids, gt.category_ids).stats
    assert 0.05 < stats["AP"] < 0.95
    assert stats["AP50"] > stats["AP"] > 0
    assert len({round(value, 6) for value in stats.values()}) > 6


def test_coco_mini_val_equals_pycocotools() -> None:
    """Real COCO annotations (crowd boxes, 80 categories) plus empty images, synthesized predictions."""
    if not COCO_MINI_VAL.exists():
        pytest.skip(f"{COCO_MINI_VAL} not present")
    ground_truth = json.loads(COCO_MINI_VAL.read_text())
    assert any(annotation["iscrowd"] for annotation in ground_truth["annotations"])
    rng = np.random.default_rng(7)
    for extra in range(3):  # images without any annotation
        ground_truth["images"].append(
            {"id": 900_000_000 + extra, "file_name": f"empty-{extra}.jpg", "width": 640, "height": 480}
        )
    category_ids = [category["id"] for category in ground_truth["categories"]]
    results = []
    for annotation in ground_truth["annotations"]:
        x, y, w, h = annotation["bbox"]
        for _ in range(int(rng.integers(0, 3))):
            jitter = rng.normal(0, 0.1, 4)
            box = [x + jitter[0] * w, y + jitter[1] * h, w * float(np.exp(jitter[2])), h * float(np.exp(jitter[3]))]
            results.append(
                {
                    "image_id": annotation["image_id"],
                    "category_id": annotation["category_id"],
                    "bbox": box,
                    "score": float(rng.random()),
                }
            )
    for image in ground_truth["images"]:
        for _ in range(int(rng.integers(0, 20))):
            w, h = float(rng.uniform(4, image["width"] / 2)), float(rng.uniform(4, image["height"] / 2))
            box = [float(rng.uniform(0, image["width"] - w)), float(rng.uniform(0, image["height"] - h)), w, h]
            results.append(
                {
                    "image_id": image["id"],
                    "category_id": int(rng.choice(category_ids)),
                    "bbox": box,
                    "score": float(rng.random()),
                }
            )
    order = rng.permutation(len(results))
    results = [results[i] for i in order]
    assert_equal_to_pycocotools(ground_truth, results)
    assert_equal_to_pycocotools(ground_truth, results, [image["id"] for image in ground_truth["images"][::2]])


def test_box_iou_matches_hand_computed_values() -> None:
    ground_truth = np.array([[0.0, 0.0, 10.0, 10.0]] * 4)
    detections = np.array(
        [[0.0, 0.0, 10.0, 5.0], [5.0, 5.0, 10.0, 10.0], [20.0, 20.0, 5.0, 5.0], [0.0, 0.0, 20.0, 20.0]]
    )
    iou = box_iou_xywh(detections, ground_truth, np.array([False, False, False, True]))
    # half overlap; 25/175; disjoint; crowd: intersection over the detection's area 100/400.
    np.testing.assert_allclose(iou, [0.5, 25 / 175, 0.0, 0.25])


def test_no_detections_scores_zero_and_no_ground_truth_scores_minus_one() -> None:
    ground_truth, _ = synthesize(seed=4, num_images=20)
    gt = parse_instances("ground-truth", ground_truth)
    empty = DetectionBoxes(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0))
    evaluation = evaluate_boxes(gt.boxes, empty, gt.image_ids, gt.category_ids)
    assert evaluation.stats["AP"] == 0.0 and evaluation.stats["AR100"] == 0.0
    assert np.isnan(evaluation.category_ap()[-1])  # a category without ground truth
    assert "maxDets=100 ] = 0.000" in format_stats(evaluation.stats)
