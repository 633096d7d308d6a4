"""From decoded images to a padded, normalized batch with its ``pixel_mask``.

The steps are split so a pipeline can run the expensive one (resize) in CPU workers and
ship small uint8 arrays to the model process, which only normalizes and pads.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .config import MAX_SIZE, MIN_SIZE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageLike = np.ndarray | Image.Image | Tensor

# The resize is torchvision's (``transforms.v2.functional.resize``, bilinear, antialiased), the one
# fine-tuning uses, done as torchvision does it: torch's uint8 kernel where it is vectorised, else
# in float, rounded. The same pixels, without importing torchvision into every decode worker
# (~1 s and ~170 MB each); tests compare the two on both paths.
NATIVE_UINT8_RESIZE = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in (
    "aarch64",
    "arm64",
)


@dataclass
class ImageBatch:
    """A padded batch: ``pixel_values`` float Tensor[B, 3, H, W], ``pixel_mask`` bool Tensor[B, H, W]
    (True on real pixels), ``original_sizes`` int64 Tensor[B, 2] as (height, width) before resizing."""

    pixel_values: Tensor
    pixel_mask: Tensor
    original_sizes: Tensor


def resized_shape(height: int, width: int, min_size: int = MIN_SIZE, max_size: int = MAX_SIZE) -> tuple[int, int]:
    """(height, width) after scaling the shortest side to ``min_size`` without the longest
    exceeding ``max_size`` (the rule of DETR and ``DetrImageProcessor``).

    Each side is at least 1 pixel: the rule rounds the short side of an extreme strip (a 20000x1
    panorama) to 0, and DETR runs on a 1-pixel-high image where a 0-pixel one cannot be resized.
    """
    if min_size < 1 or max_size < min_size:
        raise ValueError(f"need 1 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
    short, long = float(min(height, width)), float(max(height, width))
    size: float = min_size
    raw = None
    if long / short * size > max_size:
        raw = max_size * short / long
        size = int(round(raw))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    scale = raw if raw is not None else size
    if width < height:
        return max(1, int(scale * height / width)), max(1, int(size))
    return max(1, int(size)), max(1, int(scale * width / height))


def to_chw_uint8(image: ImageLike) -> Tensor:
    """uint8 Tensor[3, H, W] from an RGB uint8 array (H, W, 3), a PIL image, or a uint8 tensor (3, H, W)."""
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 array of shape (H, W, 3), got {image.dtype} {image.shape}")
        if not image.flags.writeable:  # torch.from_numpy would warn; one copy is cheap next to the resize
            image = image.copy()
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if isinstance(image, Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a uint8 tensor of shape (3, H, W), got {image.dtype} {tuple(image.shape)}")
        return image
    raise ValueError(f"expected a numpy array, PIL image or tensor, got {type(image).__name__}")


def resize_image(image: ImageLike, min_size: int = MIN_SIZE, max_size: int = MAX_SIZE) -> Tensor:
    """uint8 Tensor[3, h, w] resized by :func:`resized_shape` (bilinear, antialiased)."""
    chw = to_chw_uint8(image)
    return resize_to(chw, resized_shape(chw.shape[1], chw.shape[2], min_size, max_size))


def resize_to(image: ImageLike, shape: tuple[int, int]) -> Tensor:
    """uint8 Tensor[3, h, w] of the given (h, w), resized the way :func:`resize_image` does (for
    callers that computed the shape from a larger original, e.g. a JPEG decoded at reduced scale)."""
    chw = to_chw_uint8(image)
    if tuple(shape) == tuple(chw.shape[1:]):
        return chw
    native = NATIVE_UINT8_RESIZE and chw.device.type == "cpu"
    batch = chw[None] if native else chw[None].float()  # (1, 3, H, W)
    resized = F.interpolate(batch, size=tuple(shape), mode="bilinear", align_corners=False, antialias=True)[0]
    return resized if native else resized.round_().to(torch.uint8)


def collate(resized: Sequence[Tensor], original_sizes: Sequence[tuple[int, int]]) -> ImageBatch:
    """Normalize uint8 Tensor[3, h, w] images and pad them bottom-right to the batch maximum."""
    if not resized or len(resized) != len(original_sizes):
        raise ValueError(f"need one original size per image, got {len(resized)} images and {len(original_sizes)} sizes")
    height = max(int(im.shape[1]) for im in resized)
    width = max(int(im.shape[2]) for im in resized)
    pixel_values = torch.zeros(len(resized), 3, height, width)
    pixel_mask = torch.zeros(len(resized), height, width, dtype=torch.bool)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for i, image in enumerate(resized):
        h, w = image.shape[1:]
        pixel_values[i, :, :h, :w] = (image.float() / 255.0 - mean) / std
        pixel_mask[i, :h, :w] = True
    return ImageBatch(pixel_values, pixel_mask, torch.tensor(list(original_sizes), dtype=torch.int64))


def collate_on(
    device: torch.device | str, resized: Sequence[Tensor], original_sizes: Sequence[tuple[int, int]]
) -> ImageBatch:
    """:func:`collate` with the normalization done on ``device``.

    Host images are padded as uint8 and copied as uint8 (a quarter of float32's bytes; from pinned
    memory, asynchronously, to a GPU), then normalized there; images already on ``device`` (decoded
    there) are padded there. Same values as :func:`collate`, padding 0; every tensor is on ``device``.
    """
    if not resized or len(resized) != len(original_sizes):
        raise ValueError(f"need one original size per image, got {len(resized)} images and {len(original_sizes)} sizes")
    device = torch.device(device)
    source = resized[0].device
    pinned = source.type == "cpu" and device.type == "cuda"
    height = max(int(im.shape[1]) for im in resized)
    width = max(int(im.shape[2]) for im in resized)
    pixels = torch.zeros(len(resized), 3, height, width, dtype=torch.uint8, device=source, pin_memory=pinned)
    pixel_mask = torch.zeros(len(resized), height, width, dtype=torch.bool, device=source, pin_memory=pinned)
    for i, image in enumerate(resized):
        h, w = image.shape[1:]
        pixels[i, :, :h, :w] = image
        pixel_mask[i, :h, :w] = True
    pixels = pixels.to(device, non_blocking=True)
    pixel_mask = pixel_mask.to(device, non_blocking=True)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
    pixel_values = ((pixels.float() / 255.0 - mean) / std).masked_fill_(~pixel_mask[:, None], 0.0)
    return ImageBatch(pixel_values, pixel_mask, torch.tensor(list(original_sizes), dtype=torch.int64, device=device))


def preprocess(images: Sequence[ImageLike], min_size: int = MIN_SIZE, max_size: int = MAX_SIZE) -> ImageBatch:
    """Resize, normalize and pad decoded RGB images of any mix of sizes into one batch."""
    chw = [to_chw_uint8(im) for im in images]
    sizes = [(int(im.shape[1]), int(im.shape[2])) for im in chw]
    return collate([resize_image(im, min_size, max_size) for im in chw], sizes)
