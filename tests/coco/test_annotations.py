"""coco.annotations: the one reader of COCO instances JSON; one-line CocoFormatError naming the file and the problem."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from coco import CocoFormatError, read_instances

VALID = {
    "images": [{"id": 5, "file_name": "a.jpg"}, {"id": 2, "file_name": "sub/b.jpg"}],
    "annotations": [
        {"id": 1, "image_id": 5, "category_id": 3, "bbox": [1, 2, 3, 4], "area": 10.5, "iscrowd": 1},
        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [0, 0, 2, 5]},
    ],
    "categories": [{"id": 3, "name": "cat"}, {"id": 1, "name": "person"}],
}


def write(tmp_path: Path, document: object, name: str = "gt.json") -> str:
    path = tmp_path / name
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return str(path)


def test_valid_file_becomes_arrays_with_defaults(tmp_path: Path) -> None:
    gt = read_instances(write(tmp_path, VALID))
    assert gt.image_ids.tolist() == [5, 2] and gt.file_names == ["a.jpg", "sub/b.jpg"]
    assert gt.category_ids.tolist() == [1, 3] and gt.category_names == ["person", "cat"]
    np.testing.assert_array_equal(gt.boxes.boxes_xywh, [[1, 2, 3, 4], [0, 0, 2, 5]])
    assert gt.boxes.areas.tolist() == [10.5, 10.0]  # missing area: the box's w * h
    assert gt.boxes.is_crowd.tolist() == [True, False]  # missing iscrowd: 0


def with_annotation(**changes: object) -> dict:
    document = json.loads(json.dumps(VALID))
    document["annotations"][1].update(changes)
    return document


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ([1, 2], "not a COCO instances JSON"),
        ({"images": [], "annotations": []}, "not a COCO instances JSON"),
        ({**VALID, "images": {"id": 1}}, "'images' must be a list"),
        ({**VALID, "images": [{"id": "x", "file_name": "a.jpg"}]}, "images[0] needs an integer 'id'"),
        ({**VALID, "images": VALID["images"] * 2}, "duplicate image id"),
        ({**VALID, "categories": [{"id": 1}]}, "categories[0] needs"),
        (with_annotation(image_id=99), "refers to image_id 99"),
        (with_annotation(category_id=42), "refers to category_id 42"),
        (with_annotation(bbox=[0, 0, 1]), "annotations[1] (id 2) has bbox [0, 0, 1]; expected 4 finite numbers"),
        (with_annotation(bbox=[0, 0, -1, 4]), "negative box size"),
        (with_annotation(id=1), "duplicate annotation id 1"),
    ],
)
def test_bad_files_raise_one_line_errors(tmp_path: Path, document: object, fragment: str) -> None:
    uri = write(tmp_path, document)
    with pytest.raises(CocoFormatError) as raised:
        read_instances(uri)
    message = str(raised.value)
    assert message.startswith(uri) and fragment in message and "\n" not in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CocoFormatError, match="no such file"):
        read_instances(str(tmp_path / "absent.json"))
