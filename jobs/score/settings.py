"""The score job's settings: one frozen dataclass and its parser."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from coco import JOIN_RULE
from jobs.cli import HelpFormatter


@dataclass(frozen=True)
class ScoreConfig:
    predictions: str  # annotate's Parquet folder (or one file) or a COCO results JSON
    annotations: str  # COCO instances JSON with the ground truth
    output: str | None = None  # JSON report URI
    plot: str | None = None  # folder URI for the PNG charts
    all_images: bool = False  # score every ground-truth image, as pycocotools does
    allow_incomplete: bool = False  # no warning for an annotate output without _SUCCESS.json


def build_parser() -> argparse.ArgumentParser:
    """The job's command line (also read by the cluster manifests' tests)."""
    parser = argparse.ArgumentParser(
        prog="python -m jobs.score",
        description="COCO bbox AP of predictions against COCO ground truth, equal to pycocotools' COCOeval. "
        + JOIN_RULE,
        formatter_class=HelpFormatter,
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
        help="score every ground-truth image, as pycocotools does, counting images without "
        "predictions as having no detections (default: score only the images that have a "
        "prediction)",
    )
    parser.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="score an annotate output folder without its _SUCCESS.json (a run in progress or killed) "
        "without the warning",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> ScoreConfig:
    return ScoreConfig(
        args.predictions, args.annotations, args.output, args.plot, args.all_images, args.allow_incomplete
    )


def parse_config(argv: list[str] | None = None) -> ScoreConfig:
    """``build_parser`` + :func:`config_from_args` (``sys.argv[1:]`` when ``argv`` is None)."""
    return config_from_args(build_parser().parse_args(argv))
