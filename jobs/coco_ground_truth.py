"""Loading and validating a COCO instances JSON (``images``, ``annotations``, ``categories``).

The file is read from any fsspec URI (local path, ``s3://``, ...). Every problem a user can
cause - text that is not JSON, JSON that is not a COCO instances file, an annotation that
points at a missing image or category, a malformed box - raises ``CocoInputError`` with one
line naming the file and the problem, so the scoring job never fails inside the evaluator.

Lenient where pycocotools is lenient: ``iscrowd`` defaults to 0; ``area`` defaults to the
box's ``w * h`` (pycocotools would fail on it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import fsspec
import numpy as np

from jobs.coco_metrics import GroundTruthBoxes


class CocoInputError(ValueError):
    """A scoring input (predictions or annotations) is unusable; the message is one line for the user."""


@dataclass(frozen=True)
class GroundTruth:
    """A validated COCO instances file.

    Args:
        uri: where it was read from (for messages).
        image_ids: ``int64[I]`` image ids in file order.
        file_names: ``images[].file_name`` aligned with ``image_ids``.
        category_ids: ``int64[K]`` category ids, ascending.
        category_names: names aligned with ``category_ids``.
        boxes: the annotations as evaluator arrays (``xywh`` pixels, file order).
    """

    uri: str
    image_ids: np.ndarray
    file_names: list[str]
    category_ids: np.ndarray
    category_names: list[str]
    boxes: GroundTruthBoxes


def read_json_uri(uri: str) -> object:
    """Parse a JSON document from an fsspec URI, turning I/O and syntax problems into ``CocoInputError``."""
    try:
        with fsspec.open(uri, "rb") as stream:
            raw = stream.read()
    except FileNotFoundError:
        raise CocoInputError(f"{uri}: no such file") from None
    except IsADirectoryError:
        raise CocoInputError(f"{uri}: is a directory, expected a JSON file") from None
    except (OSError, ValueError, ImportError) as error:  # ValueError/ImportError: unknown or uninstalled protocol
        raise CocoInputError(f"{uri}: cannot be read ({' '.join(str(error).split())})") from None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CocoInputError(f"{uri}: not valid JSON ({error})") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require_list_of_dicts(uri: str, document: dict, key: str) -> list[dict]:
    entries = document.get(key)
    if not isinstance(entries, list):
        raise CocoInputError(f"{uri}: not a COCO instances JSON: '{key}' must be a list, got {type(entries).__name__}")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise CocoInputError(f"{uri}: {key}[{index}] is {type(entry).__name__}, expected an object")
    return entries


def parse_ground_truth(uri: str, document: object) -> GroundTruth:
    """Validate a parsed COCO instances document and convert it to arrays.

    Args:
        uri: the source, named in error messages.
        document: the parsed JSON.

    Raises:
        CocoInputError: naming ``uri`` and the first problem found.
    """
    if not isinstance(document, dict) or not all(key in document for key in ("images", "annotations", "categories")):
        found = sorted(document)[:5] if isinstance(document, dict) else type(document).__name__
        raise CocoInputError(
            f"{uri}: not a COCO instances JSON (expected an object with 'images', 'annotations', 'categories'; got {found})"
        )
    images = _require_list_of_dicts(uri, document, "images")
    annotations = _require_list_of_dicts(uri, document, "annotations")
    categories = _require_list_of_dicts(uri, document, "categories")

    for index, image in enumerate(images):
        if not _is_int(image.get("id")) or not isinstance(image.get("file_name"), str):
            raise CocoInputError(
                f"{uri}: images[{index}] needs an integer 'id' and a string 'file_name', got {image!r:.120}"
            )
    image_ids = np.array([image["id"] for image in images], dtype=np.int64)
    if len(np.unique(image_ids)) != len(image_ids):
        raise CocoInputError(f"{uri}: duplicate image id {_first_duplicate(image_ids)} in 'images'")

    for index, category in enumerate(categories):
        if not _is_int(category.get("id")) or not isinstance(category.get("name"), str):
            raise CocoInputError(
                f"{uri}: categories[{index}] needs an integer 'id' and a string 'name', got {category!r:.120}"
            )
    category_order = sorted(range(len(categories)), key=lambda index: categories[index]["id"])
    category_ids = np.array([categories[index]["id"] for index in category_order], dtype=np.int64)
    if len(np.unique(category_ids)) != len(category_ids):
        raise CocoInputError(f"{uri}: duplicate category id {_first_duplicate(category_ids)} in 'categories'")

    for index, annotation in enumerate(annotations):
        bbox = annotation.get("bbox")
        if not (
            _is_int(annotation.get("id"))
            and _is_int(annotation.get("image_id"))
            and _is_int(annotation.get("category_id"))
            and isinstance(bbox, list)
            and len(bbox) == 4
            and all(_is_number(value) for value in bbox)
            and (annotation.get("area") is None or _is_number(annotation["area"]))
        ):
            raise CocoInputError(
                f"{uri}: annotations[{index}] needs integer 'id', 'image_id', 'category_id' and a 'bbox' of 4 finite numbers,"
                f" got {annotation!r:.160}"
            )
    boxes = np.array([annotation["bbox"] for annotation in annotations], dtype=np.float64).reshape(-1, 4)
    annotation_ids = np.array([annotation["id"] for annotation in annotations], dtype=np.int64)
    annotation_image_ids = np.array([annotation["image_id"] for annotation in annotations], dtype=np.int64)
    annotation_category_ids = np.array([annotation["category_id"] for annotation in annotations], dtype=np.int64)
    areas = np.array(
        [
            bbox[2] * bbox[3] if annotation.get("area") is None else annotation["area"]
            for annotation, bbox in zip(annotations, boxes, strict=True)
        ],
        dtype=np.float64,
    )
    is_crowd = np.array([bool(annotation.get("iscrowd", 0)) for annotation in annotations], dtype=bool)

    if len(np.unique(annotation_ids)) != len(annotation_ids):
        raise CocoInputError(f"{uri}: duplicate annotation id {_first_duplicate(annotation_ids)} in 'annotations'")
    unknown_image = ~np.isin(annotation_image_ids, image_ids)
    if unknown_image.any():
        index = int(np.argmax(unknown_image))
        raise CocoInputError(
            f"{uri}: annotations[{index}] refers to image_id {annotation_image_ids[index]} not in 'images'"
        )
    unknown_category = ~np.isin(annotation_category_ids, category_ids)
    if unknown_category.any():
        index = int(np.argmax(unknown_category))
        raise CocoInputError(
            f"{uri}: annotations[{index}] refers to category_id {annotation_category_ids[index]} not in 'categories'"
        )
    negative = (boxes[:, 2] < 0) | (boxes[:, 3] < 0)
    if negative.any():
        index = int(np.argmax(negative))
        raise CocoInputError(f"{uri}: annotations[{index}] has a negative box size, bbox={boxes[index].tolist()}")

    return GroundTruth(
        uri=uri,
        image_ids=image_ids,
        file_names=[image["file_name"] for image in images],
        category_ids=category_ids,
        category_names=[categories[index]["name"] for index in category_order],
        boxes=GroundTruthBoxes(
            image_ids=annotation_image_ids,
            category_ids=annotation_category_ids,
            boxes_xywh=boxes,
            areas=areas,
            is_crowd=is_crowd,
            annotation_ids=annotation_ids,
        ),
    )


def _first_duplicate(values: np.ndarray) -> int:
    unique, counts = np.unique(values, return_counts=True)
    return int(unique[np.argmax(counts > 1)])


def load_ground_truth(uri: str) -> GroundTruth:
    """Read and validate a COCO instances JSON from an fsspec URI.

    Raises:
        CocoInputError: the file is missing, not JSON, or not a valid COCO instances file.
    """
    return parse_ground_truth(uri, read_json_uri(uri))
