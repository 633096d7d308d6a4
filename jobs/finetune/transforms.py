"""DETR's training augmentation and evaluation resize, on ``torchvision.transforms.v2``.

Training (DETR's ``make_coco_transforms``): random horizontal flip, then with equal chance
either a multi-scale resize (shortest side drawn from ``scales``, longest at most ``max_size``)
or a resize to one of ``crop_scales``, a random crop of side ``crop_min_size..crop_max_size``
and the multi-scale resize. Evaluation resizes the shortest side to ``eval_size`` with the
rule of :func:`detr.resized_shape` (the one :func:`detr.resize_image` applies at inference).

Boxes travel as ``tv_tensors.BoundingBoxes`` so every geometric step moves them with the
pixels; boxes a crop leaves without area are removed with their labels. The final step turns
a sample into ``(uint8 Tensor[3, h, w], target)`` with ``boxes`` as normalized cxcywh.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as F
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import box_convert

from detr.config import MAX_SIZE, MIN_SIZE
from detr.preprocessing import resized_shape

AUGMENTATIONS = ("detr", "scale", "none")

# DETR's recipe at its reference scale (shortest side 800); AugmentationConfig.scaled() shrinks it.
_REFERENCE_SCALES = tuple(range(480, 801, 32))
_REFERENCE_CROP_SCALES = (400, 500, 600)
_REFERENCE_CROP_RANGE = (384, 600)


@dataclass(frozen=True)
class AugmentationConfig:
    """Image scales of training and evaluation, in pixels.

    Args:
        scales: shortest-side sizes the multi-scale resize draws from.
        max_size: longest side never exceeds this (training and evaluation).
        crop_scales: shortest-side sizes before the random crop.
        crop_min_size, crop_max_size: range of the crop's height and width.
        eval_size: shortest side at evaluation.
        augmentation: ``detr`` (flip + multi-scale or resize-crop-resize), ``scale`` (flip +
            multi-scale, no crop) or ``none`` (the evaluation resize only).
    """

    scales: tuple[int, ...] = _REFERENCE_SCALES
    max_size: int = MAX_SIZE
    crop_scales: tuple[int, ...] = _REFERENCE_CROP_SCALES
    crop_min_size: int = _REFERENCE_CROP_RANGE[0]
    crop_max_size: int = _REFERENCE_CROP_RANGE[1]
    eval_size: int = MIN_SIZE
    augmentation: str = "detr"

    def __post_init__(self) -> None:
        if self.augmentation not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {self.augmentation!r}")
        sizes = (*self.scales, *self.crop_scales, self.eval_size)
        if not self.scales or not self.crop_scales or min(sizes) < 1 or max(sizes) > self.max_size:
            raise ValueError(f"image sizes must lie in [1, max_size={self.max_size}], got {sorted(set(sizes))}")
        if not 1 <= self.crop_min_size <= self.crop_max_size:
            raise ValueError(
                f"need 1 <= crop_min_size <= crop_max_size, got {self.crop_min_size}, {self.crop_max_size}"
            )

    @classmethod
    def from_dict(cls, values: dict) -> AugmentationConfig:
        """Inverse of ``dataclasses.asdict`` (lists back to tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    @classmethod
    def scaled(
        cls, min_size: int = MIN_SIZE, max_size: int = MAX_SIZE, augmentation: str = "detr"
    ) -> AugmentationConfig:
        """DETR's recipe with every size multiplied by ``min_size / 800``; ``min_size=800`` is DETR's exactly."""
        if not 1 <= min_size <= max_size:
            raise ValueError(f"need 1 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
        ratio = min_size / MIN_SIZE
        scale = lambda size: max(1, round(size * ratio))  # noqa: E731 - one-line rescaling rule
        return cls(
            scales=tuple(sorted({scale(s) for s in _REFERENCE_SCALES})),
            max_size=max_size,
            crop_scales=tuple(scale(s) for s in _REFERENCE_CROP_SCALES),
            crop_min_size=scale(_REFERENCE_CROP_RANGE[0]),
            crop_max_size=scale(_REFERENCE_CROP_RANGE[1]),
            eval_size=min_size,
            augmentation=augmentation,
        )


def _image_size(flat_inputs: list[Any]) -> tuple[int, int]:
    images = [x for x in flat_inputs if isinstance(x, tv_tensors.Image)]
    if not images:
        raise ValueError("detection transforms need the image as a tv_tensors.Image")
    height, width = F.get_size(images[0])
    return height, width


class ResizeShortestSide(v2.Transform):
    """Resize so the shortest side is one of ``sizes`` (drawn at random) and the longest at most
    ``max_size``, with :func:`detr.resized_shape`'s rounding; boxes follow."""

    def __init__(self, sizes: Sequence[int], max_size: int) -> None:
        super().__init__()
        if not sizes:
            raise ValueError("ResizeShortestSide needs at least one size")
        self.sizes = tuple(int(s) for s in sizes)
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = _image_size(flat_inputs)
        size = self.sizes[int(torch.randint(len(self.sizes), ()))]
        return {"shape": resized_shape(height, width, size, self.max_size)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=list(params["shape"]), antialias=True)


class RandomSizeCrop(v2.Transform):
    """Crop a random region whose height and width are drawn from ``[min_size, max_size]``
    (capped by the image), as DETR's ``RandomSizeCrop``; boxes are shifted, not yet clipped."""

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        self.min_size = min_size
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = _image_size(flat_inputs)
        crop_h = int(torch.randint(min(self.min_size, height), min(height, self.max_size) + 1, ()))
        crop_w = int(torch.randint(min(self.min_size, width), min(width, self.max_size) + 1, ()))
        top = int(torch.randint(0, height - crop_h + 1, ()))
        left = int(torch.randint(0, width - crop_w + 1, ()))
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def to_model_target(image: tv_tensors.Image, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """The last step: a plain uint8 Tensor[3, h, w] and a target with normalized cxcywh boxes.

    Returns:
        ``(image, target)`` with ``target["boxes"]`` float32 Tensor[N, 4] normalized cxcywh (by the
        transformed image's size), ``labels`` int64 Tensor[N], ``image_id``, ``orig_size`` (H, W before
        any transform) and ``size`` ((h, w) after it).
    """
    height, width = F.get_size(image)
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    boxes_xyxy = target["boxes"].as_subclass(Tensor).float()
    boxes = box_convert(boxes_xyxy, "xyxy", "cxcywh") / scale
    return image.as_subclass(Tensor), {**target, "boxes": boxes, "labels": target["labels"], "size": (height, width)}


class DetectionTransform:
    """Callable ``(image, target) -> (uint8 Tensor[3, h, w], target)`` for :class:`CocoDetectionDataset`."""

    def __init__(self, geometric: Callable[..., Any]) -> None:
        self.geometric = geometric

    def __call__(self, image: tv_tensors.Image, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        image, target = self.geometric(image, target)
        return to_model_target(image, target)


def train_transform(config: AugmentationConfig) -> DetectionTransform:
    """DETR's training augmentation at ``config``'s scales (see the module docstring)."""
    multi_scale = ResizeShortestSide(config.scales, config.max_size)
    if config.augmentation == "none":
        return eval_transform(config)
    if config.augmentation == "scale":
        return DetectionTransform(v2.Compose([v2.RandomHorizontalFlip(), multi_scale]))
    crop_path = v2.Compose(
        [
            ResizeShortestSide(config.crop_scales, config.max_size),
            RandomSizeCrop(config.crop_min_size, config.crop_max_size),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=1.0),  # drops boxes the crop left (almost) empty, and their labels
            multi_scale,
        ]
    )
    return DetectionTransform(v2.Compose([v2.RandomHorizontalFlip(), v2.RandomChoice([multi_scale, crop_path])]))


def eval_transform(config: AugmentationConfig) -> DetectionTransform:
    """The fixed evaluation resize (shortest side ``eval_size``, longest at most ``max_size``)."""
    return DetectionTransform(ResizeShortestSide([config.eval_size], config.max_size))
