"""Annotate's Parquet output -> a COCO results JSON, for scoring against a COCO annotations file.

    python -m jobs.coco_export OUTPUT ANNOTATIONS.json RESULTS.json

Rows are joined to ``images[].file_name`` of the annotations file by :mod:`coco.join`'s rule,
the one scoring uses, to find each ``image_id``; every detection becomes ``{"image_id",
"category_id", "bbox": [x, y, width, height], "score"}`` in absolute pixels, the format
``pycocotools.COCO.loadRes`` reads. Rows with an error and images the annotations file does not
list are left out and counted. Files are streamed one at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from coco import CocoFormatError, match_uris_to_images, read_instances, xyxy_to_xywh
from coco.detection_table import incomplete_warning, table_files
from jobs import cli
from storage import filesystem_for, folder_exists


@dataclass(frozen=True)
class ExportConfig:
    output: str  # the annotate job's OUTPUT folder URI
    annotations: str  # COCO instances JSON whose images[].file_name rows are joined to
    results: str  # URI of the results JSON to write
    allow_incomplete: bool = False  # no warning for an annotate output without _SUCCESS.json


@dataclass(frozen=True)
class ExportSummary:
    images: int  # rows matched to an annotated image
    unmatched: int  # rows whose file name the annotations file does not list
    errors: int  # rows with an error (no detections to export)
    detections: int

    def summary(self) -> str:
        return (
            f"coco_export: {self.detections} detections from {self.images} images; "
            f"{self.unmatched} images not in the annotations file, {self.errors} error rows skipped"
        )


def export_coco_results(output_uri: str, annotations_uri: str, results_uri: str) -> ExportSummary:
    """Write the detections under ``output_uri`` as a COCO results JSON at ``results_uri``."""
    instances = read_instances(annotations_uri)
    fs, root = filesystem_for(output_uri)
    files = table_files(fs, root) if folder_exists(fs, root) else []
    if not files:
        raise CocoFormatError(f"{output_uri}: no Parquet files")
    uri_of_image: dict[int, str] = {}
    images = unmatched = errors = detections = 0
    out_fs, out_path = filesystem_for(results_uri)
    with out_fs.open(out_path, "w") as out:
        out.write("[")
        for path in files:
            with fs.open(path, "rb") as stream:
                rows = pq.read_table(stream, columns=["uri", "detections", "error"]).to_pylist()
            ok = [row for row in rows if row["error"] is None]
            errors += len(rows) - len(ok)
            for row, image_id in zip(ok, match_uris_to_images([row["uri"] for row in ok], instances).tolist()):
                if image_id < 0:
                    unmatched += 1
                    continue
                if uri_of_image.setdefault(image_id, row["uri"]) != row["uri"]:
                    raise CocoFormatError(
                        f"{output_uri}: inputs {uri_of_image[image_id]} and {row['uri']} both match "
                        f"ground-truth image id {image_id}"
                    )
                images += 1
                if not row["detections"]:
                    continue
                boxes_xywh = xyxy_to_xywh(np.array([d["box"] for d in row["detections"]])).tolist()
                for detection, box in zip(row["detections"], boxes_xywh):
                    out.write(",\n" if detections else "\n")
                    out.write(
                        json.dumps(
                            {
                                "image_id": image_id,
                                "category_id": detection["category_id"],
                                "bbox": box,
                                "score": detection["score"],
                            }
                        )
                    )
                    detections += 1
        out.write("\n]\n")
    return ExportSummary(images, unmatched, errors, detections)


def build_parser() -> argparse.ArgumentParser:
    """The job's command line (also read by the cluster manifests' tests)."""
    parser = argparse.ArgumentParser(
        prog="python -m jobs.coco_export",
        description="Turn the Parquet files of `python -m jobs.annotate` into a COCO results JSON "
        "(image ids found by joining file names to a COCO annotations file, as jobs.score does).",
    )
    parser.add_argument("output", help="the annotate job's OUTPUT folder URI")
    parser.add_argument(
        "annotations", help="COCO annotations JSON URI (instances_*.json) whose images[].file_name to match"
    )
    parser.add_argument("results", help="URI of the results JSON to write")
    parser.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="export an annotate output folder without its _SUCCESS.json (a run in progress or killed) "
        "without the warning",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> ExportConfig:
    return ExportConfig(args.output, args.annotations, args.results, args.allow_incomplete)


def main(config: ExportConfig) -> ExportSummary:
    warning = None if config.allow_incomplete else incomplete_warning(config.output)
    if warning:
        print(f"coco_export: warning: {warning}", file=sys.stderr)
    return export_coco_results(config.output, config.annotations, config.results)


def run(argv: Sequence[str] | None = None) -> int:
    """``python -m jobs.coco_export``: the exit status."""
    return cli.run("coco_export", build_parser, config_from_args, main, argv)
