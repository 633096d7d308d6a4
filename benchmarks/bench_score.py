"""Benchmark: ``jobs.score`` against pycocotools' COCOeval on a COCO-val-sized synthetic case.

    python benchmarks/bench_score.py [--images 5000] [--seed 0] [--workdir DIR]

Generates (seeded) 5,000 images, ~35k ground-truth boxes over COCO's 80 category ids (crowd
regions included) and 100 detections per image (jittered ground truth plus false positives),
written as a COCO instances JSON, annotate's Parquet folder and a COCO results JSON with the
same detections. Then times, in this one process and on the same machine:

* pycocotools: ``COCO(gt)`` + ``loadRes(results.json)`` + evaluate + accumulate + summarize;
* faster-coco-eval (if installed), the same steps, as a peer for the choice of engine;
* ours: ``jobs.score`` (load + evaluate + summarize) on the Parquet folder and on the results
  JSON, and the whole ``python -m jobs.score`` command (interpreter start and imports included).

Prints each time and pycocotools' time divided by ours, and checks the 12 stats agree.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from jobs.score import main as score  # noqa: E402
from jobs.score.settings import ScoreConfig  # noqa: E402

# COCO's 80 category ids (1..90 with gaps), so category handling is realistic.
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
DETECTIONS_PER_IMAGE = 100  # DETR's query count: every image yields 100 detections
GROUND_TRUTH_PER_IMAGE = 7.3  # COCO val2017: 36,781 boxes / 5,000 images
PARQUET_PARTS = 8  # a Ray write produces several part files


def synthesize(num_images: int, seed: int) -> tuple[dict, list[dict]]:
    """COCO-style ground truth and DETR-like results (``xywh``, float32-representable)."""
    rng = np.random.default_rng(seed)
    images, annotations, results = [], [], []
    for index in range(num_images):
        image_id = 139 + 97 * index
        width, height = int(rng.integers(320, 641)), int(rng.integers(240, 641))
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": width, "height": height})
        count = 0 if rng.random() < 0.01 else int(rng.poisson(GROUND_TRUTH_PER_IMAGE))
        w = np.exp(rng.uniform(np.log(4), np.log(width), count))
        h = np.exp(rng.uniform(np.log(4), np.log(height), count))
        x, y = rng.uniform(0, 1, count) * (width - w), rng.uniform(0, 1, count) * (height - h)
        category = rng.choice(COCO_CATEGORY_IDS, count)
        crowd = rng.random(count) < 0.01
        for j in range(count):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(category[j]),
                    "bbox": [float(x[j]), float(y[j]), float(w[j]), float(h[j])],
                    "area": float(w[j] * h[j] * 0.75),
                    "iscrowd": int(crowd[j]),
                }
            )
        # 3 jittered copies of each ground-truth box, the rest false positives.
        hits = min(3 * count, DETECTIONS_PER_IMAGE)
        source = np.arange(hits) % max(count, 1)
        jitter = rng.normal(0, 0.1, (hits, 4))
        det_w = np.concatenate(
            [w[source] * np.exp(jitter[:, 2]), rng.uniform(2, width / 2, DETECTIONS_PER_IMAGE - hits)]
        )
        det_h = np.concatenate(
            [h[source] * np.exp(jitter[:, 3]), rng.uniform(2, height / 2, DETECTIONS_PER_IMAGE - hits)]
        )
        det_x = np.concatenate(
            [
                x[source] + jitter[:, 0] * w[source],
                rng.uniform(0, 1, DETECTIONS_PER_IMAGE - hits) * (width - det_w[hits:]),
            ]
        )
        det_y = np.concatenate(
            [
                y[source] + jitter[:, 1] * h[source],
                rng.uniform(0, 1, DETECTIONS_PER_IMAGE - hits) * (height - det_h[hits:]),
            ]
        )
        det_category = np.concatenate([category[source], rng.choice(COCO_CATEGORY_IDS, DETECTIONS_PER_IMAGE - hits)])
        relabel = rng.random(DETECTIONS_PER_IMAGE) < 0.1
        det_category[relabel] = rng.choice(COCO_CATEGORY_IDS, int(relabel.sum()))
        scores = np.concatenate([rng.uniform(0.3, 1.0, hits), rng.uniform(0.0, 0.7, DETECTIONS_PER_IMAGE - hits)])
        # Round through float32 (annotate's Parquet types) so both inputs hold identical numbers.
        xyxy = np.stack([det_x, det_y, det_x + det_w, det_y + det_h], axis=1).astype(np.float32).astype(np.float64)
        scores = scores.astype(np.float32).astype(np.float64)
        for j in range(DETECTIONS_PER_IMAGE):
            x0, y0, x1, y1 = xyxy[j]
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(det_category[j]),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": float(scores[j]),
                }
            )
    categories = [{"id": c, "name": f"category-{c}", "supercategory": "thing"} for c in COCO_CATEGORY_IDS]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def write_annotate_parquet(folder: Path, ground_truth: dict, results: list[dict]) -> None:
    """The same detections in annotate's schema: one row per image, boxes back to ``xyxy``."""
    image_ids = np.array([r["image_id"] for r in results])
    boxes = np.array([r["bbox"] for r in results])
    xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1).astype(np.float32)
    detection = pa.StructArray.from_arrays(
        [
            pa.array([r["category_id"] for r in results], pa.int32()),
            pa.array([""] * len(results)),
            pa.array([r["score"] for r in results], pa.float32()),
            pa.ListArray.from_arrays(
                pa.array(np.arange(0, 4 * len(results) + 1, 4), pa.int32()), pa.array(xyxy.ravel())
            ),
        ],
        names=["category_id", "label", "score", "box"],
    )
    order = [image["id"] for image in ground_truth["images"]]
    assert np.all(np.diff(image_ids) >= 0) and np.all(np.diff(order) > 0), "synthesize() emits images in id order"
    offsets = np.r_[np.searchsorted(image_ids, order), len(results)]
    table = pa.table(
        {
            "uri": [f"s3://coco/val2017/{image['file_name']}" for image in ground_truth["images"]],
            "width": pa.array([image["width"] for image in ground_truth["images"]], pa.int32()),
            "height": pa.array([image["height"] for image in ground_truth["images"]], pa.int32()),
            "detections": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), detection),
            "error": pa.array([None] * len(order), pa.string()),
            "model": ["detr-resnet-50"] * len(order),
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    for part, rows in enumerate(np.array_split(np.arange(len(table)), PARQUET_PARTS)):
        pq.write_table(table.take(rows), folder / f"part-{part:05d}.parquet")


def time_reference(module: str, annotations: Path, results: Path) -> tuple[float, list[float]]:
    """pycocotools-style API (pycocotools or faster_coco_eval): load + evaluate + accumulate + summarize."""
    if module == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    else:
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(annotations))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(str(results)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return time.perf_counter() - start, [float(value) for value in evaluator.stats[:12]]


def time_ours(predictions: Path, annotations: Path) -> tuple[float, list[float]]:
    start = time.perf_counter()
    report = score(ScoreConfig(str(predictions), str(annotations))).report
    return time.perf_counter() - start, list(report["stats"].values())


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="number of images (COCO val2017 has 5,000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the synthetic case")
    parser.add_argument("--workdir", help="where to write the inputs (default: a temporary folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(args.workdir or scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        ground_truth, results = synthesize(args.images, args.seed)
        annotations, results_json, parquet = (
            workdir / "instances.json",
            workdir / "results.json",
            workdir / "predictions",
        )
        annotations.write_text(json.dumps(ground_truth))
        results_json.write_text(json.dumps(results))
        write_annotate_parquet(parquet, ground_truth, results)
        print(f"machine: {os.cpu_count()} cores, {cpu_model()}, Python {platform.python_version()}")
        print(
            f"case: {len(ground_truth['images'])} images, {len(ground_truth['annotations'])} ground-truth boxes "
            f"({sum(a['iscrowd'] for a in ground_truth['annotations'])} crowd), {len(results)} detections"
        )

        rows = []
        reference_time, reference_stats = time_reference("pycocotools", annotations, results_json)
        rows.append(("pycocotools COCOeval (results JSON)", reference_time, reference_stats))
        try:
            rows.append(
                ("faster-coco-eval (results JSON)", *time_reference("faster_coco_eval", annotations, results_json))
            )
        except ImportError:
            print("faster-coco-eval not installed; skipping that peer")
        rows.append(("jobs.score, in process (Parquet folder)", *time_ours(parquet, annotations)))
        rows.append(("jobs.score, in process (results JSON)", *time_ours(results_json, annotations)))
        metrics = workdir / "metrics.json"
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "jobs.score", str(parquet), str(annotations), "--output", str(metrics)],
            check=True,
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        command_seconds = time.perf_counter() - start
        rows.append(
            (
                "python -m jobs.score (Parquet folder, whole command)",
                command_seconds,
                list(json.loads(metrics.read_text())["stats"].values()),
            )
        )

        print(f"{'engine':<55} {'seconds':>8} {'pycocotools / this':>20} {'max |stat diff|':>16}")
        for name, seconds, stats in rows:
            difference = float(np.max(np.abs(np.array(stats) - np.array(reference_stats))))
            print(f"{name:<55} {seconds:>8.2f} {reference_time / seconds:>19.1f}x {difference:>16.1e}")
        print(f"AP={reference_stats[0]:.4f} AP50={reference_stats[1]:.4f} AR100={reference_stats[8]:.4f}")


if __name__ == "__main__":
    main()
