"""Small test images made in memory: encoded files, flat quadrants that show any rotation, noisy scenes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def quadrants(height: int = 60, width: int = 80) -> np.ndarray:
    """Four flat colours (red, green / blue, white): survive JPEG and show any rotation."""
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 2, : width // 2] = (220, 30, 30)
    image[: height // 2, width // 2 :] = (30, 200, 30)
    image[height // 2 :, : width // 2] = (30, 30, 220)
    image[height // 2 :, width // 2 :] = (240, 240, 240)
    return image


def scene(seed: int, height: int = 64, width: int = 96) -> np.ndarray:
    """A noisy background with a few flat rectangles, different per seed."""
    rng = np.random.default_rng(seed)
    image = (rng.random((height, width, 3)) * 80).astype(np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, height - 16), rng.integers(0, width - 16)
        image[y : y + 16, x : x + 24] = rng.integers(60, 255, 3)
    return image
