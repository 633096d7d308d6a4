"""Score predictions against COCO ground truth: the 12 COCO bbox stats, per-category AP, PR curves.

    python -m jobs.score PREDICTIONS ANNOTATIONS [--output metrics.json] [--plot DIR] [--all-images]

Runs the same locally and under ``ray job submit -- python -m jobs.score ...``; it needs no
Ray cluster (the vectorized evaluator scores COCO-val-sized input in a few seconds on one core).

PREDICTIONS is the Parquet folder written by ``jobs.annotate`` or a COCO results JSON, and
ANNOTATIONS a COCO instances JSON, each at any fsspec URI. See ``jobs.coco_predictions`` for
how Parquet rows are joined to ground-truth images by file name, and ``jobs.coco_metrics``
for the evaluator (equal to pycocotools' ``COCOeval``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import fsspec
import numpy as np

from jobs.coco_ground_truth import CocoInputError, GroundTruth, load_ground_truth
from jobs.coco_metrics import STAT_NAMES, CocoEvaluation, evaluate_boxes, format_stats
from jobs.coco_predictions import Predictions, load_predictions

JOIN_RULE = (
    "Parquet rows are joined to images by file name: a file_name with k path components "
    "matches an input URI whose last k path components are equal (s3://b/val2017/1.jpg matches "
    "'1.jpg' and 'val2017/1.jpg'); the longest matching file_name wins."
)


def build_parser() -> argparse.ArgumentParser:
    """The job's command line (also read by the cluster manifests' tests)."""
    parser = argparse.ArgumentParser(
        prog="python -m jobs.score",
        description="COCO bbox AP of predictions against COCO ground truth, equal to pycocotools' COCOeval. "
        + JOIN_RULE,
    )
    parser.add_argument(
        "predictions",
        metavar="PREDICTIONS",
        help="Parquet folder written by jobs.annotate, or a COCO results JSON (fsspec URI)",
    )
    parser.add_argument(
        "annotations", metavar="ANNOTATIONS", help="COCO instances JSON with the ground truth (fsspec URI)"
    )
    parser.add_argument(
        "--output", metavar="URI", help="write the stats, per-category AP/AP50 and counts as JSON to this URI"
    )
    parser.add_argument("--plot", metavar="DIR", help="write PR-curve and per-category AP charts (PNG) under this URI")
    parser.add_argument(
        "--all-images",
        action="store_true",
        help="score every ground-truth image, as pycocotools does, counting images without predictions as "
        "having no detections (default: score only the images that have a prediction)",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``sys.argv[1:]`` when ``argv`` is None)."""
    return build_parser().parse_args(argv)


def build_report(
    ground_truth: GroundTruth, predictions: Predictions, evaluation: CocoEvaluation, image_ids: np.ndarray
) -> dict:
    """The JSON-ready result: stats under ``STAT_NAMES``, per-category AP/AP50 (null without ground truth), counts."""
    ap, ap50 = evaluation.category_ap(), evaluation.category_ap(iou_index=0)
    counts = predictions.counts
    return {
        "predictions": predictions.uri,
        "annotations": ground_truth.uri,
        "stats": {name: evaluation.stats[name] for name in STAT_NAMES},
        "per_category": [
            {
                "category_id": int(category_id),
                "name": name,
                "ap": None if np.isnan(ap[k]) else float(ap[k]),
                "ap50": None if np.isnan(ap50[k]) else float(ap50[k]),
                "ground_truth_boxes": int(evaluation.ground_truth_counts[k]),
            }
            for k, (category_id, name) in enumerate(
                zip(evaluation.category_ids, ground_truth.category_names, strict=True)
            )
        ],
        "counts": {
            "images_scored": len(image_ids),
            "images_with_predictions_without_ground_truth": counts.images_without_ground_truth,
            "ground_truth_images_without_predictions": len(ground_truth.image_ids) - counts.images_predicted,
            "failed_inputs": counts.failed_inputs,
            "detections_scored": counts.detections_kept,
            "detections_skipped": {
                "malformed": counts.skipped_malformed,
                "not_finite": counts.skipped_not_finite,
                "negative_size": counts.skipped_negative_size,
                "unknown_category": counts.skipped_unknown_category,
            },
        },
    }


def format_counts(report: dict) -> str:
    """The counts as aligned ``name: value`` lines."""
    counts = dict(report["counts"])
    skipped = counts.pop("detections_skipped")
    lines = [f" {name.replace('_', ' ')}: {value}" for name, value in counts.items()]
    lines += [
        f" detections skipped ({reason.replace('_', ' ')}): {value}" for reason, value in skipped.items() if value
    ]
    return "\n".join(lines)


def _write(uri: str, data: bytes) -> None:
    """Write bytes to an fsspec URI, creating local parent folders."""
    filesystem, path = fsspec.core.url_to_fs(uri)
    if "file" in filesystem.protocol:
        filesystem.makedirs(filesystem._parent(path), exist_ok=True)
    filesystem.pipe_file(path, data)


def score(args: argparse.Namespace) -> dict:
    """Load, evaluate, and write the optional JSON and plots; returns the report.

    Raises:
        CocoInputError: an input is unusable (one-line message naming the file).
    """
    ground_truth = load_ground_truth(args.annotations)
    predictions = load_predictions(args.predictions, ground_truth)
    image_ids = ground_truth.image_ids if args.all_images else predictions.image_ids
    evaluation = evaluate_boxes(ground_truth.boxes, predictions.detections, image_ids, ground_truth.category_ids)
    report = build_report(ground_truth, predictions, evaluation, image_ids)
    if args.output:
        _write(args.output, (json.dumps(report, indent=2) + "\n").encode())
    if args.plot:
        from jobs.score_plots import render_plots  # matplotlib costs ~0.5 s to import; only when asked

        for name, png in render_plots(evaluation, ground_truth.category_names).items():
            _write(f"{args.plot.rstrip('/')}/{name}", png)
    return report


def main(args: argparse.Namespace) -> int:
    """Run the job; prints the stats and counts. Returns the exit code (2 for unusable input)."""
    try:
        report = score(args)
    except CocoInputError as error:
        print(f"score: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # writing --output / --plot
        print(f"score: error: cannot write results: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(format_stats(report["stats"]))
    print(format_counts(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
