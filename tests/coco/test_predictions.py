"""Reading annotate's Parquet and COCO results JSON, and joining them to ground-truth images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from coco import CocoFormatError, load_predictions, match_uris_to_images, parse_instances, xyxy_to_xywh

DETECTION = pa.struct(
    [("category_id", pa.int32()), ("label", pa.string()), ("score", pa.float32()), ("box", pa.list_(pa.float32()))]
)
SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("detections", pa.list_(DETECTION)),
        ("error", pa.string()),
        ("model", pa.string()),
    ]
)
GROUND_TRUTH = parse_instances(
    "gt.json",
    {
        "images": [
            {"id": 1, "file_name": "a.jpg"},
            {"id": 2, "file_name": "val/b.jpg"},
            {"id": 3, "file_name": "c.jpg"},
            {"id": 4, "file_name": "x/a.jpg"},
        ],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [0, 0, 10, 10], "area": 100}],
        "categories": [{"id": 7, "name": "seven"}, {"id": 9, "name": "nine"}],
    },
)


def det(category: int, score: float, box: list[float]) -> dict:
    return {"category_id": category, "label": "", "score": score, "box": box}


def row(uri: str, detections: list[dict], error: str | None = None) -> dict:
    return {"uri": uri, "width": 10, "height": 10, "detections": detections, "error": error, "model": "m"}


def write(path: Path, rows: list[dict], schema: pa.Schema = SCHEMA) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def test_join_rule_matches_trailing_components_longest_first() -> None:
    uris = [
        "s3://bucket/deep/a.jpg",
        "s3://bucket/x/a.jpg",
        "/data/val/b.jpg",
        "file:///data/b.jpg",
        "c.jpg",
        "gs://b/val/d.jpg",
    ]
    assert match_uris_to_images(uris, GROUND_TRUTH).tolist() == [1, 4, 2, -1, 3, -1]


def test_ambiguous_file_name_is_an_error() -> None:
    doubled = parse_instances(
        "dup.json",
        {
            "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "a.jpg"}],
            "annotations": [],
            "categories": [],
        },
    )
    with pytest.raises(CocoFormatError, match="dup.json: file_name 'a.jpg'"):
        match_uris_to_images(["s3://b/a.jpg"], doubled)


def test_parquet_rows_are_flattened_converted_and_counted(tmp_path: Path) -> None:
    write(
        tmp_path / "p" / "part-1.parquet",
        [
            row(
                "s3://b/a.jpg",
                [det(7, 0.5, [1, 2, 4, 8]), det(9, 0.25, [0, 0, 1, 1]), det(7, float("nan"), [0, 0, 1, 1])],
            ),
            row("s3://b/val/b.jpg", []),  # predicted, nothing found: still scored
            row("s3://b/unknown.jpg", [det(7, 0.9, [0, 0, 1, 1])]),
        ],
    )
    write(
        tmp_path / "p" / "deeper" / "part-2.parquet",
        [
            row("s3://b/c.jpg", [det(8, 0.5, [0, 0, 1, 1]), det(7, 0.5, [5, 5, 1, 9]), det(7, 0.75, [0, 0, 1])]),
            row("s3://b/x/a.jpg", [], error="decode failed"),
        ],
    )
    (tmp_path / "p" / "_SUCCESS").write_text("")  # non-Parquet files are ignored
    predictions = load_predictions(str(tmp_path / "p"), GROUND_TRUTH)
    detections = predictions.detections
    # every detection on c.jpg is bad (unknown category, negative size, 3 values)
    assert detections.image_ids.tolist() == [1, 1] and detections.category_ids.tolist() == [7, 9]
    np.testing.assert_array_equal(detections.boxes_xywh, [[1, 2, 3, 6], [0, 0, 1, 1]])
    np.testing.assert_array_equal(detections.scores, [0.5, 0.25])
    assert predictions.image_ids.tolist() == [1, 2, 3]
    counts = predictions.counts
    assert (counts.images_predicted, counts.images_without_ground_truth, counts.failed_inputs) == (3, 1, 1)
    assert (
        counts.skipped_malformed,
        counts.skipped_not_finite,
        counts.skipped_negative_size,
        counts.skipped_unknown_category,
    ) == (1, 1, 1, 1)


def test_single_parquet_file_and_duplicate_rows(tmp_path: Path) -> None:
    write(tmp_path / "one.parquet", [row("s3://b/a.jpg", [det(7, 0.5, [1, 2, 4, 8])])])
    assert load_predictions(str(tmp_path / "one.parquet"), GROUND_TRUTH).counts.detections_kept == 1
    write(tmp_path / "twice" / "p.parquet", [row("s3://b/a.jpg", []), row("s3://b/a.jpg", [])])
    with pytest.raises(CocoFormatError, match="appears in more than one successful row"):
        load_predictions(str(tmp_path / "twice"), GROUND_TRUTH)
    write(tmp_path / "two-uris" / "p.parquet", [row("s3://one/c.jpg", []), row("s3://two/c.jpg", [])])
    with pytest.raises(CocoFormatError, match="both match ground-truth image id 3"):
        load_predictions(str(tmp_path / "two-uris"), GROUND_TRUTH)


def test_parquet_folder_file_and_missing_uri_on_s3(s3_bucket) -> None:
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    table = pa.Table.from_pylist([row("s3://b/a.jpg", [det(7, 0.5, [1, 2, 4, 8])])], schema=SCHEMA)
    with fs.open(f"{s3_bucket}/detections/run/part-1.parquet", "wb") as stream:
        pq.write_table(table, stream)
    for uri in (f"s3://{s3_bucket}/detections", f"s3://{s3_bucket}/detections/run/part-1.parquet"):
        assert load_predictions(uri, GROUND_TRUTH).counts.detections_kept == 1
    with pytest.raises(CocoFormatError, match="detection: no such file or directory"):
        load_predictions(f"s3://{s3_bucket}/detection", GROUND_TRUTH)  # a prefix of a folder's name is not it


def test_parquet_without_annotate_columns_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "other" / "p.parquet", [{"path": "a.jpg"}], schema=pa.schema([("path", pa.string())]))
    with pytest.raises(
        CocoFormatError, match=r"other: not annotate's Parquet output: missing column\(s\) uri, detections, error"
    ):
        load_predictions(str(tmp_path / "other"), GROUND_TRUTH)


def test_only_failed_rows_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "failed" / "p.parquet", [row("s3://b/a.jpg", [], error="boom")])
    with pytest.raises(CocoFormatError, match="all 1 of its rows are annotate errors"):
        load_predictions(str(tmp_path / "failed"), GROUND_TRUTH)


def test_results_json(tmp_path: Path) -> None:
    results = [
        {"image_id": 3, "category_id": 7, "bbox": [1, 2, 3, 4], "score": 0.5},
        {"image_id": 3, "category_id": 7, "bbox": [1, 2, -3, 4], "score": 0.5},
        {"image_id": 99, "category_id": 7, "bbox": [1, 2, 3, 4], "score": 0.5},
    ]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    predictions = load_predictions(str(path), GROUND_TRUTH)
    np.testing.assert_array_equal(predictions.detections.boxes_xywh, [[1, 2, 3, 4]])
    assert predictions.counts.skipped_negative_size == 1 and predictions.counts.images_without_ground_truth == 1

    path.write_text(json.dumps(results + [{"image_id": 3, "bbox": [0, 0, 1, 1], "score": 1}]))
    with pytest.raises(CocoFormatError, match=r"results.json: not a COCO results JSON: entry \[3\] lacks category_id"):
        load_predictions(str(path), GROUND_TRUTH)


def test_xyxy_to_xywh() -> None:
    np.testing.assert_array_equal(xyxy_to_xywh(np.array([[1.0, 2.0, 4.0, 8.0]], dtype=np.float32)), [[1, 2, 3, 6]])
