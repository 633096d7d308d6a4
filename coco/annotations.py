"""The one reader of COCO instances JSON (``images``, ``annotations``, ``categories``).

Scoring, COCO export and validation during fine-tuning all read ground truth through
:func:`read_instances`, so they agree on what a file says. Every problem a user can cause - text
that is not JSON, JSON that is not an instances file, an annotation pointing at a missing image
or category, a malformed box - raises :class:`CocoFormatError` with one line naming the file and
the first problem.

Lenient where pycocotools is lenient: ``iscrowd`` defaults to 0, ``area`` to the box's
``w * h``, and image ``height``/``width`` may be absent unless the caller needs them
(``require_sizes``, as training does).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from storage import StorageError, read_bytes

from .evaluation import GroundTruthBoxes

SECTIONS = ("images", "annotations", "categories")


class CocoFormatError(ValueError):
    """A COCO input (instances JSON, results JSON, detections table) that cannot be used; the
    message is one line naming the file and the problem."""


@dataclass(frozen=True)
class CocoInstances:
    """A validated COCO instances file as arrays.

    Args:
        uri: where it was read from (for messages).
        image_ids: ``int64[I]`` image ids in file order.
        file_names: ``images[].file_name`` aligned with ``image_ids``.
        image_sizes: ``int64[I, 2]`` (height, width) as the file states them, -1 where it does not.
        category_ids: ``int64[K]`` category ids, ascending.
        category_names: names aligned with ``category_ids``.
        boxes: the annotations as evaluator arrays (``xywh`` pixels, file order).
    """

    uri: str
    image_ids: np.ndarray
    file_names: list[str]
    image_sizes: np.ndarray
    category_ids: np.ndarray
    category_names: list[str]
    boxes: GroundTruthBoxes


def read_json(uri: str) -> object:
    """Parse a JSON document from an fsspec URI.

    Raises:
        CocoFormatError: the file is missing, unreadable or not JSON.
    """
    try:
        raw = read_bytes(uri)
    except StorageError as error:
        raise CocoFormatError(str(error)) from None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CocoFormatError(f"{uri}: not valid JSON ({error})") from None


def read_instances(uri: str, *, require_sizes: bool = False) -> CocoInstances:
    """Read and validate a COCO instances JSON from an fsspec URI.

    Args:
        require_sizes: every image must state a positive integer ``height`` and ``width``.
    Raises:
        CocoFormatError: the file is missing, not JSON, or not a valid COCO instances file.
    """
    return parse_instances(uri, read_json(uri), require_sizes=require_sizes)


def parse_instances(uri: str, document: object, *, require_sizes: bool = False) -> CocoInstances:
    """Validate a parsed COCO instances document and convert it to arrays.

    Args:
        uri: the source, named in error messages.
        document: the parsed JSON.
        require_sizes: see :func:`read_instances`.
    Raises:
        CocoFormatError: naming ``uri`` and the first problem found.
    """
    if not isinstance(document, dict):
        raise _fail(
            uri,
            f"not a COCO instances JSON: expected a JSON object with {list(SECTIONS)}, got {type(document).__name__}",
        )
    for key in SECTIONS:
        if key not in document:
            raise _fail(uri, f"not a COCO instances JSON: missing the {key!r} list (found {sorted(document)[:5]})")
        _require_objects(uri, document, key)
    image_ids, file_names, image_sizes = _images(uri, document["images"], require_sizes)
    if not document["categories"] and document["annotations"]:
        raise _fail(uri, f"has no categories for its {len(document['annotations'])} annotations")
    category_ids, category_names = _categories(uri, document["categories"])
    boxes = _annotations(uri, document["annotations"], set(image_ids.tolist()), set(category_ids.tolist()))
    return CocoInstances(uri, image_ids, file_names, image_sizes, category_ids, category_names, boxes)


def _fail(uri: str, reason: str) -> CocoFormatError:
    return CocoFormatError(f"{uri}: {reason}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require_objects(uri: str, document: dict, key: str) -> None:
    entries = document[key]
    if not isinstance(entries, list):
        raise _fail(uri, f"not a COCO instances JSON: '{key}' must be a list, got {type(entries).__name__}")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise _fail(uri, f"{key}[{index}] is {type(entry).__name__}, expected an object")


def _images(uri: str, images: list[dict], require_sizes: bool) -> tuple[np.ndarray, list[str], np.ndarray]:
    seen: set[int] = set()
    sizes = np.full((len(images), 2), -1, dtype=np.int64)
    for index, image in enumerate(images):
        if not _is_int(image.get("id")) or not isinstance(image.get("file_name"), str):
            raise _fail(uri, f"images[{index}] needs an integer 'id' and a string 'file_name', got {image!r:.120}")
        if image["id"] in seen:
            raise _fail(uri, f"images[{index}] repeats image id {image['id']} (duplicate image id)")
        seen.add(image["id"])
        height, width = image.get("height"), image.get("width")
        if height is None and width is None and not require_sizes:
            continue
        if not (_is_int(height) and _is_int(width)) or min(height, width) < 1:
            raise _fail(uri, f"images[{index}] has bad size {height}x{width}; expected positive integer height, width")
        sizes[index] = (height, width)
    ids = np.array([image["id"] for image in images], dtype=np.int64)
    return ids, [image["file_name"] for image in images], sizes


def _categories(uri: str, categories: list[dict]) -> tuple[np.ndarray, list[str]]:
    seen: set[int] = set()
    for index, category in enumerate(categories):
        if not _is_int(category.get("id")) or not isinstance(category.get("name"), str):
            raise _fail(uri, f"categories[{index}] needs an integer 'id' and a string 'name', got {category!r:.120}")
        if category["id"] in seen:
            raise _fail(uri, f"categories[{index}] repeats category id {category['id']} (duplicate category ids)")
        seen.add(category["id"])
    ordered = sorted(categories, key=lambda category: category["id"])
    return np.array([c["id"] for c in ordered], dtype=np.int64), [c["name"] for c in ordered]


def _annotations(uri: str, annotations: list[dict], image_ids: set[int], category_ids: set[int]) -> GroundTruthBoxes:
    seen: set[int] = set()
    for index, annotation in enumerate(annotations):
        where = f"annotations[{index}] (id {annotation.get('id')})"
        missing = [key for key in ("id", "image_id", "category_id", "bbox") if key not in annotation]
        if missing:
            raise _fail(uri, f"{where} lacks {missing}")
        for key in ("id", "image_id", "category_id"):
            if not _is_int(annotation[key]):
                raise _fail(uri, f"{where} needs an integer {key!r}, got {annotation[key]!r:.40}")
        bbox = annotation["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise _fail(uri, f"{where} has bbox {bbox!r:.80}; expected 4 finite numbers [x, y, width, height]")
        if bbox[2] < 0 or bbox[3] < 0:
            raise _fail(uri, f"{where} has a negative box size, bbox={bbox}")
        if annotation.get("area") is not None and not _is_number(annotation["area"]):
            raise _fail(uri, f"{where} has area {annotation['area']!r:.40}; expected a finite number")
        if annotation["id"] in seen:
            raise _fail(uri, f"{where}: duplicate annotation id {annotation['id']}")
        seen.add(annotation["id"])
        if annotation["image_id"] not in image_ids:
            raise _fail(uri, f"{where} refers to image_id {annotation['image_id']}, which is not in images")
        if annotation["category_id"] not in category_ids:
            raise _fail(uri, f"{where} refers to category_id {annotation['category_id']}, which is not in categories")
    boxes = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)
    return GroundTruthBoxes(
        image_ids=np.array([a["image_id"] for a in annotations], dtype=np.int64),
        category_ids=np.array([a["category_id"] for a in annotations], dtype=np.int64),
        boxes_xywh=boxes,
        areas=np.array(
            [b[2] * b[3] if a.get("area") is None else a["area"] for a, b in zip(annotations, boxes)], dtype=np.float64
        ),
        is_crowd=np.array([bool(a.get("iscrowd", 0)) for a in annotations], dtype=bool),
        annotation_ids=np.array([a["id"] for a in annotations], dtype=np.int64),
    )
