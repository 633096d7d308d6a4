"""A COCO-format detection dataset for training: images from any fsspec URI plus an instances JSON.

Category ids of the file (any integers, e.g. 10, 20, 30) become contiguous class indices
``0..K-1`` in ascending id order, through :func:`detr.categories.categories_from_coco`; the
table travels with the fine-tuned weights so predictions map back to the file's ids.

For training, crowd annotations are ignored (as DETR does), boxes are clipped to the image
and those left without area are dropped and counted; images without any annotation stay in
the dataset as negatives. The raw file is kept as well, for COCO evaluation.
Images are decoded as the annotate job decodes them (:func:`jobs.image_decoding.decode_image`):
EXIF orientation applied and any mode made RGB, because COCO boxes (and the file's
``width``/``height``) are in the pixels of the upright image a viewer shows.
A file that cannot be used raises :class:`CocoFormatError` naming the file and the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import fsspec
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from detr.categories import Category, categories_from_coco
from jobs.coco_ground_truth import CocoInputError, read_json_uri
from jobs.image_decoding import ImageDecodeError, decode_image

Sample = tuple[tv_tensors.Image, dict[str, Any]]


class CocoFormatError(ValueError):
    """An annotations file or image that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class ImageRecord:
    """One image and its training boxes.

    Args:
        image_id: the file's image id.
        file_name: path relative to the images URI.
        height, width: as the annotations file states them (pixels).
        boxes_xyxy: float32 ``[N, 4]`` absolute xyxy pixels, clipped to the image, crowd and empty boxes removed.
        labels: int64 ``[N]`` contiguous class indices.
    """

    image_id: int
    file_name: str
    height: int
    width: int
    boxes_xyxy: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class CocoAnnotations:
    """A parsed instances file.

    Args:
        uri: where it was read from.
        images: one record per image, in file order.
        categories: class index -> category (id, name).
        num_crowd: crowd annotations left out of training.
        num_degenerate: boxes dropped because they have no area inside the image.
        document: the file's ``images`` / ``annotations`` / ``categories`` (for COCO evaluation).
    """

    uri: str
    images: tuple[ImageRecord, ...]
    categories: tuple[Category, ...]
    num_crowd: int
    num_degenerate: int
    document: dict

    @property
    def num_boxes(self) -> int:
        return sum(len(r.labels) for r in self.images)


def _fail(uri: str, reason: str) -> CocoFormatError:
    return CocoFormatError(f"{uri}: {reason}")


def _read_json(uri: str) -> Any:
    # One JSON reader for all COCO inputs (shared with the score job); training reports its own error type.
    try:
        return read_json_uri(uri)
    except CocoInputError as error:
        raise CocoFormatError(str(error)) from None


def _require(uri: str, entry: Mapping, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(entry, Mapping):
        raise _fail(uri, f"{where} is not an object")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise _fail(uri, f"{where} lacks {missing}")


def read_coco_annotations(uri: str) -> CocoAnnotations:
    """Read and check a COCO instances JSON from any fsspec URI.

    Raises:
        CocoFormatError: unreadable or malformed file; the message names ``uri`` and the first problem.
    """
    document = _read_json(uri)
    if not isinstance(document, Mapping):
        raise _fail(uri, f"expected a JSON object with images/annotations/categories, got {type(document).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(document.get(key), list):
            raise _fail(uri, f"missing the {key!r} list")
    if not document["categories"]:
        raise _fail(uri, "has no categories")
    for i, c in enumerate(document["categories"]):
        _require(uri, c, ("id", "name"), f"categories[{i}]")
    try:
        categories = categories_from_coco(document["categories"])
    except (TypeError, ValueError) as error:
        raise _fail(uri, f"bad categories ({error})") from None
    class_of = {c.id: index for index, c in enumerate(categories)}

    sizes: dict[int, tuple[int, int]] = {}
    for i, image in enumerate(document["images"]):
        _require(uri, image, ("id", "file_name", "height", "width"), f"images[{i}]")
        if image["id"] in sizes:
            raise _fail(uri, f"images[{i}] repeats image id {image['id']}")
        if not (isinstance(image["height"], int) and isinstance(image["width"], int)) or min(image["height"], image["width"]) < 1:
            raise _fail(uri, f"images[{i}] has bad size {image['height']}x{image['width']}")
        sizes[image["id"]] = (image["height"], image["width"])

    boxes: dict[int, list[list[float]]] = {i: [] for i in sizes}
    labels: dict[int, list[int]] = {i: [] for i in sizes}
    num_crowd = num_degenerate = 0
    for i, ann in enumerate(document["annotations"]):
        where = f"annotations[{i}] (id {ann.get('id')})" if isinstance(ann, Mapping) else f"annotations[{i}]"
        _require(uri, ann, ("image_id", "category_id", "bbox"), where)
        if ann["image_id"] not in sizes:
            raise _fail(uri, f"{where} refers to image_id {ann['image_id']!r}, which is not in images")
        if ann["category_id"] not in class_of:
            raise _fail(uri, f"{where} refers to category_id {ann['category_id']!r}, which is not in categories")
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
            raise _fail(uri, f"{where} has bbox {bbox!r}; expected 4 finite numbers [x, y, width, height]")
        if ann.get("iscrowd", 0):
            num_crowd += 1
            continue
        height, width = sizes[ann["image_id"]]
        x, y, w, h = bbox
        x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
        x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
        if x1 <= x0 or y1 <= y0:
            num_degenerate += 1
            continue
        boxes[ann["image_id"]].append([x0, y0, x1, y1])
        labels[ann["image_id"]].append(class_of[ann["category_id"]])

    records = tuple(
        ImageRecord(
            image_id=image["id"], file_name=str(image["file_name"]), height=image["height"], width=image["width"],
            boxes_xyxy=np.asarray(boxes[image["id"]], dtype=np.float32).reshape(-1, 4),
            labels=np.asarray(labels[image["id"]], dtype=np.int64),
        )
        for image in document["images"]
    )
    kept = {k: document[k] for k in ("images", "annotations", "categories")}
    return CocoAnnotations(uri, records, categories, num_crowd, num_degenerate, kept)


def read_image(uri: str) -> Tensor:
    """uint8 Tensor[3, H, W] RGB, upright, from an encoded image (JPEG, PNG, ...) at any fsspec URI.

    Decoded by the annotate job's decoder, so training pairs the annotations with the same
    pixels annotate predicts on: EXIF-rotated photos upright, grayscale/CMYK/16-bit/palette/alpha
    as RGB, decompression bombs refused.
    """
    try:
        with fsspec.open(uri, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CocoFormatError(f"{uri}: no such image file") from None
    try:
        rgb = decode_image(data)
    except ImageDecodeError as error:
        raise CocoFormatError(f"{uri}: not a decodable image ({error.reason})") from None
    return torch.from_numpy(rgb.transpose(2, 0, 1).copy())  # the copy: CHW, contiguous and writable


def _size_mismatch(uri: str, image: Tensor, record: ImageRecord, annotations_uri: str) -> CocoFormatError:
    """The error for an image whose size is not the one its annotations were made on.

    Width and height swapped almost always means the annotations were drawn on the stored
    pixels of an EXIF-rotated photo, not on the upright image that COCO tools expect.
    """
    height, width = image.shape[1:]
    hint = ""
    if (height, width) == (record.width, record.height):
        hint = " (width and height swapped: EXIF orientation? boxes must be in the upright image's pixels)"
    return CocoFormatError(
        f"{uri}: image is {height}x{width} but {annotations_uri} says {record.height}x{record.width}{hint}"
    )


class CocoDetectionDataset(Dataset):
    """Images and targets of a COCO instances file.

    Item ``i`` is ``transform(image, target)`` where, before the transform, ``image`` is a
    ``tv_tensors.Image`` uint8 [3, H, W] and ``target`` holds ``boxes`` (``tv_tensors.BoundingBoxes``,
    absolute xyxy pixels), ``labels`` int64 Tensor[N] (class indices), ``image_id`` (int) and
    ``orig_size`` ((height, width)).

    Args:
        images_uri: folder URI the ``file_name`` entries are relative to.
        annotations: the parsed instances file.
        transform: applied to ``(image, target)``; None returns them as read.
    """

    def __init__(
        self, images_uri: str, annotations: CocoAnnotations, transform: Callable[[Any, Any], Any] | None = None,
    ) -> None:
        self.images_uri = images_uri.rstrip("/")
        self.annotations = annotations
        self.transform = transform

    def __len__(self) -> int:
        return len(self.annotations.images)

    def __getitem__(self, index: int) -> Any:
        record = self.annotations.images[index]
        uri = f"{self.images_uri}/{record.file_name}"
        image = read_image(uri)
        if tuple(image.shape[1:]) != (record.height, record.width):
            raise _size_mismatch(uri, image, record, self.annotations.uri)
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(record.boxes_xyxy), format="XYXY", canvas_size=(record.height, record.width)
            ),
            "labels": torch.from_numpy(record.labels),
            "image_id": record.image_id,
            "orig_size": (record.height, record.width),
        }
        image = tv_tensors.Image(image)
        if self.transform is None:
            return image, target
        return self.transform(image, target)
