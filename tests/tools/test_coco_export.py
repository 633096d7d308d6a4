"""jobs/coco_export: annotate's Parquet to a COCO results JSON, joined to images by coco.join's rule."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from coco import DETECTIONS_SCHEMA, CocoFormatError
from jobs.coco_export import export_coco_results


def test_coco_export_matches_real_coco_file_names(tmp_path, coco_mini):
    annotations = coco_mini / "annotations" / "instances_val2017.json"
    images = json.loads(annotations.read_text())["images"][:3]
    detection = {"category_id": 18, "label": "dog", "score": 0.9, "box": [10.0, 20.0, 110.0, 70.0]}
    ok = {"width": 1, "height": 1, "error": None, "model": "m"}
    rows = [
        {"uri": f"s3://bucket/a/{images[0]['file_name']}", "detections": [detection], **ok},
        {"uri": f"s3://bucket/b/{images[1]['file_name']}", "detections": [detection, detection], **ok},
        {
            "uri": f"s3://bucket/c/{images[2]['file_name']}",
            "width": None,
            "height": None,
            "detections": [],
            "error": "truncated JPEG",
            "model": "m",
        },
        {"uri": "s3://bucket/d/not-coco.jpg", "detections": [detection], **ok},
    ]
    (tmp_path / "out").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=DETECTIONS_SCHEMA), tmp_path / "out" / "part.parquet")
    results = tmp_path / "results.json"
    export = export_coco_results(str(tmp_path / "out"), str(annotations), str(results))
    assert (export.images, export.unmatched, export.errors, export.detections) == (2, 1, 1, 3)
    exported = json.loads(results.read_text())
    assert [d["image_id"] for d in exported] == [images[0]["id"], images[1]["id"], images[1]["id"]]
    assert exported[0]["bbox"] == [10.0, 20.0, 100.0, 50.0] and exported[0]["category_id"] == 18
    from pycocotools.coco import COCO

    assert len(COCO(str(annotations)).loadRes(str(results)).anns) == 3
    rows.append(dict(rows[0], uri=f"s3://bucket/elsewhere/{images[0]['file_name']}"))
    pq.write_table(pa.Table.from_pylist(rows, schema=DETECTIONS_SCHEMA), tmp_path / "out" / "part.parquet")
    with pytest.raises(CocoFormatError, match=f"both match ground-truth image id {images[0]['id']}"):
        export_coco_results(str(tmp_path / "out"), str(annotations), str(results))
    with pytest.raises(CocoFormatError, match=r"missing\.json: no such file"):
        export_coco_results(str(tmp_path / "out"), str(tmp_path / "missing.json"), str(results))


def test_same_base_name_in_two_folders_is_told_apart_by_the_folder(tmp_path):
    annotations = tmp_path / "instances.json"
    annotations.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a/1.jpg"}, {"id": 2, "file_name": "b/1.jpg"}],
                "annotations": [],
                "categories": [{"id": 18, "name": "dog"}],
            }
        )
    )
    detection = {"category_id": 18, "label": "dog", "score": 0.9, "box": [10.0, 20.0, 110.0, 70.0]}
    rows = [
        {
            "uri": f"s3://bucket/{folder}/1.jpg",
            "width": 1,
            "height": 1,
            "detections": [detection] * count,
            "error": None,
            "model": "m",
        }
        for folder, count in (("a", 1), ("b", 2))
    ]
    (tmp_path / "out").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=DETECTIONS_SCHEMA), tmp_path / "out" / "part.parquet")
    export = export_coco_results(str(tmp_path / "out"), str(annotations), str(tmp_path / "results.json"))
    assert (export.images, export.unmatched, export.detections) == (2, 0, 3)
    exported = json.loads((tmp_path / "results.json").read_text())
    assert [d["image_id"] for d in exported] == [1, 2, 2]
