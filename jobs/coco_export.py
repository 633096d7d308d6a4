"""Annotate's Parquet output -> a COCO results JSON, for scoring against a COCO annotations file.

    python -m jobs.coco_export OUTPUT ANNOTATIONS.json RESULTS.json

Each row's file name (the last part of its ``uri``) is matched against ``images[].file_name``
of the annotations file (its last part too) to find the ``image_id``; every detection becomes
``{"image_id", "category_id", "bbox": [x, y, width, height], "score"}`` in absolute pixels,
the format ``pycocotools.COCO.loadRes`` reads. Rows with an error and images the annotations
file does not list are left out and counted. Files are streamed one at a time.
"""

from __future__ import annotations

import argparse
import json
import posixpath
import sys
from dataclasses import dataclass

import pyarrow.parquet as pq
import torch
from torchvision.ops import box_convert

from jobs.coco_ground_truth import CocoInputError, read_json_uri
from jobs.image_source import ImageSourceError, filesystem_for


class CocoExportError(ValueError):
    """An unusable input: the message names the file and the problem in one line."""


@dataclass(frozen=True)
class ExportSummary:
    images: int  # rows matched to an annotated image
    unmatched: int  # rows whose file name the annotations file does not list
    errors: int  # rows with an error (no detections to export)
    detections: int

    def line(self) -> str:
        return (
            f"coco_export: {self.detections} detections from {self.images} images; "
            f"{self.unmatched} images not in the annotations file, {self.errors} error rows skipped"
        )


def image_ids_by_file_name(annotations_uri: str) -> dict[str, int]:
    """``images[].file_name`` (last path part) -> ``images[].id`` of a COCO annotations file."""
    # One JSON reader for all COCO inputs (shared with the score job); export reports its own error type.
    try:
        document = read_json_uri(annotations_uri)
    except CocoInputError as error:
        raise CocoExportError(str(error)) from None
    images = document.get("images") if isinstance(document, dict) else None
    if not isinstance(images, list):
        raise CocoExportError(f"{annotations_uri}: not a COCO annotations file (no 'images' list)")
    ids: dict[str, int] = {}
    for image in images:
        try:
            name, image_id = posixpath.basename(str(image["file_name"])), int(image["id"])
        except (KeyError, TypeError, ValueError):
            raise CocoExportError(
                f"{annotations_uri}: an entry of 'images' lacks file_name or id: {image!r:.80}"
            ) from None
        if ids.setdefault(name, image_id) != image_id:
            raise CocoExportError(f"{annotations_uri}: file name {name!r} belongs to two images")
    return ids


def export_coco_results(output_uri: str, annotations_uri: str, results_uri: str) -> ExportSummary:
    """Write the detections under ``output_uri`` as a COCO results JSON at ``results_uri``."""
    ids = image_ids_by_file_name(annotations_uri)
    fs, root = filesystem_for(output_uri)
    files = sorted(p for p in fs.find(root) if p.endswith(".parquet")) if fs.isdir(root) else []
    if not files:
        raise CocoExportError(f"{output_uri}: no Parquet files")
    seen: dict[str, str] = {}
    images = unmatched = errors = detections = 0
    out_fs, out_path = filesystem_for(results_uri)
    with out_fs.open(out_path, "w") as out:
        out.write("[")
        for path in files:
            with fs.open(path, "rb") as stream:
                rows = pq.read_table(stream, columns=["uri", "detections", "error"]).to_pylist()
            for row in rows:
                if row["error"] is not None:
                    errors += 1
                    continue
                name = posixpath.basename(row["uri"])
                if name not in ids:
                    unmatched += 1
                    continue
                if seen.setdefault(name, row["uri"]) != row["uri"]:
                    raise CocoExportError(
                        f"{output_uri}: {seen[name]} and {row['uri']} both match COCO file name {name!r}"
                    )
                images += 1
                if not row["detections"]:
                    continue
                boxes_xywh = box_convert(torch.tensor([d["box"] for d in row["detections"]]), "xyxy", "xywh").tolist()
                for detection, box in zip(row["detections"], boxes_xywh):
                    out.write(",\n" if detections else "\n")
                    out.write(json.dumps({
                        "image_id": ids[name], "category_id": detection["category_id"], "bbox": box,
                        "score": detection["score"],
                    }))
                    detections += 1
        out.write("\n]\n")
    return ExportSummary(images, unmatched, errors, detections)


def build_parser() -> argparse.ArgumentParser:
    """The job's command line (also read by the cluster manifests' tests)."""
    parser = argparse.ArgumentParser(
        prog="python -m jobs.coco_export",
        description="Turn the Parquet files of `python -m jobs.annotate` into a COCO results JSON "
                    "(image ids found by matching file names against a COCO annotations file).",
    )
    parser.add_argument("output", help="the annotate job's OUTPUT folder URI")
    parser.add_argument("annotations",
                        help="COCO annotations JSON URI (instances_*.json) whose images[].file_name to match")
    parser.add_argument("results", help="URI of the results JSON to write")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``sys.argv[1:]`` when ``argv`` is None)."""
    return build_parser().parse_args(argv)


def main(args: argparse.Namespace) -> ExportSummary:
    return export_coco_results(args.output, args.annotations, args.results)


def run_cli(argv: list[str] | None = None) -> int:
    try:
        summary = main(parse_args(argv))
    except (CocoExportError, ImageSourceError) as error:
        print(f"coco_export: error: {error}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(run_cli())
