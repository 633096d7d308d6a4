"""A COCO-format detection dataset for training: images from any fsspec URI plus an instances JSON.

The file is read by :func:`coco.read_instances`, the parser scoring uses too. Category ids of
the file (any integers, e.g. 10, 20, 30) become contiguous class indices ``0..K-1`` in ascending
id order; the table travels with the fine-tuned weights so predictions map back to the file's ids.

For training, crowd annotations are ignored (as DETR does), boxes are clipped to the image
and those left without area are dropped and counted; images without any annotation stay in
the dataset as negatives. Images are decoded by :func:`detr.decode_image` (EXIF orientation
applied, any mode made RGB), because COCO boxes (and the file's ``width``/``height``) are in the
pixels of the upright image a viewer shows. A file that cannot be used raises
:class:`coco.CocoFormatError` naming the file and the reason, or - for training, with
``skip_bad_images`` - becomes a :class:`BadImage` that the batch leaves out and the job counts.

Indexed with a :class:`jobs.finetune.sampler.SampleKey`, the dataset draws the sample's
augmentation from the key's seed alone, so it does not depend on which process reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from coco import CocoFormatError, CocoInstances, read_instances, xywh_to_xyxy
from detr import Category, ImageDecodeError, decode_image
from jobs.finetune.sampler import SampleKey
from storage import StorageError, read_bytes

Sample = tuple[tv_tensors.Image, dict[str, Any]]


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
class BadImage:
    """An image the dataset could not use (unreadable, undecodable, or not the size its annotations say).

    Args:
        index: the dataset index.
        image_id: the file's image id.
        reason: one line naming the image's URI and what is wrong with it.
    """

    index: int
    image_id: int
    reason: str


@dataclass(frozen=True)
class TrainingSet:
    """An instances file made ready for training.

    Args:
        instances: the file as :func:`coco.read_instances` parsed it (what validation scores against).
        images: one record per image, in file order.
        categories: class index -> category (id, name).
        num_crowd: crowd annotations left out of training.
        num_degenerate: boxes dropped because they have no area inside the image.
    """

    instances: CocoInstances
    images: tuple[ImageRecord, ...]
    categories: tuple[Category, ...]
    num_crowd: int
    num_degenerate: int

    @property
    def uri(self) -> str:
        return self.instances.uri

    @property
    def num_boxes(self) -> int:
        return sum(len(r.labels) for r in self.images)


def read_training_set(uri: str) -> TrainingSet:
    """Read a COCO instances JSON from any fsspec URI for training (every image needs its size).

    Raises:
        CocoFormatError: unreadable or malformed file; the message names ``uri`` and the first problem.
    """
    instances = read_instances(uri, require_sizes=True)
    if not instances.category_names:
        raise CocoFormatError(f"{uri}: has no categories")
    gt = instances.boxes
    categories = tuple(Category(int(i), n) for i, n in zip(instances.category_ids, instances.category_names))
    labels = np.searchsorted(instances.category_ids, gt.category_ids)  # ids ascending: index = class
    row_of_image = {image_id: row for row, image_id in enumerate(instances.image_ids.tolist())}
    rows = np.array([row_of_image[i] for i in gt.image_ids.tolist()], dtype=np.int64)
    heights, widths = instances.image_sizes[rows, 0], instances.image_sizes[rows, 1]
    boxes = xywh_to_xyxy(gt.boxes_xywh)
    boxes = np.stack(
        [
            np.clip(boxes[:, 0], 0, widths),
            np.clip(boxes[:, 1], 0, heights),
            np.clip(boxes[:, 2], 0, widths),
            np.clip(boxes[:, 3], 0, heights),
        ],
        axis=1,
    )
    has_area = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    kept = np.flatnonzero(~gt.is_crowd & has_area)
    kept = kept[np.argsort(rows[kept], kind="stable")]  # grouped by image, file order within
    bounds = np.searchsorted(rows[kept], np.arange(len(instances.image_ids) + 1))
    records = tuple(
        ImageRecord(
            image_id=image_id,
            file_name=file_name,
            height=height,
            width=width,
            boxes_xyxy=boxes[kept[bounds[row] : bounds[row + 1]]].astype(np.float32).reshape(-1, 4),
            labels=labels[kept[bounds[row] : bounds[row + 1]]].astype(np.int64),
        )
        for row, (image_id, file_name, (height, width)) in enumerate(
            zip(instances.image_ids.tolist(), instances.file_names, instances.image_sizes.tolist())
        )
    )
    return TrainingSet(instances, records, categories, int(gt.is_crowd.sum()), int((~gt.is_crowd & ~has_area).sum()))


def read_image(uri: str) -> Tensor:
    """uint8 Tensor[3, H, W] RGB, upright, from an encoded image (JPEG, PNG, ...) at any fsspec URI.

    Decoded by the annotate job's decoder, so training pairs the annotations with the same
    pixels annotate predicts on: EXIF-rotated photos upright, grayscale/CMYK/16-bit/palette/alpha
    as RGB, decompression bombs refused.
    """
    try:
        data = read_bytes(uri)
    except StorageError as error:
        raise CocoFormatError(str(error)) from None
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
        skip_bad_images: return a :class:`BadImage` for an image that cannot be used instead of raising.
    """

    def __init__(
        self,
        images_uri: str,
        annotations: TrainingSet,
        transform: Callable[[Any, Any], Any] | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        self.images_uri = images_uri.rstrip("/")
        self.annotations = annotations
        self.transform = transform
        self.skip_bad_images = skip_bad_images

    def __len__(self) -> int:
        return len(self.annotations.images)

    def __getitem__(self, key: int | SampleKey) -> Any:
        """Sample ``key`` (an index, or a :class:`SampleKey` whose seed fixes the augmentation).

        Raises:
            CocoFormatError: the image cannot be used (only without ``skip_bad_images``).
        """
        index, seed = (key.index, key.seed) if isinstance(key, SampleKey) else (key, None)
        record = self.annotations.images[index]
        try:
            image, target = self._read(record)
        except CocoFormatError as error:
            if not self.skip_bad_images:
                raise
            return BadImage(index, record.image_id, str(error))
        if self.transform is None:
            return image, target
        if seed is None:
            return self.transform(image, target)
        with torch.random.fork_rng(devices=[]):  # the transforms draw from torch's global generator
            torch.manual_seed(seed)
            return self.transform(image, target)

    def _read(self, record: ImageRecord) -> Sample:
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
        return tv_tensors.Image(image), target
