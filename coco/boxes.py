"""Box format conversions in NumPy, so COCO code never imports torch (``torchvision.ops`` is the
model's; these are its float64 equivalents for pixel boxes)."""

from __future__ import annotations

import numpy as np


def xyxy_to_xywh(boxes_xyxy: np.ndarray) -> np.ndarray:
    """``float64[N, 4]`` ``[x_min, y_min, x_max, y_max]`` pixels -> ``[x, y, width, height]`` pixels."""
    boxes_xyxy = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes_xyxy[:, :2], boxes_xyxy[:, 2:] - boxes_xyxy[:, :2]], axis=1)


def xywh_to_xyxy(boxes_xywh: np.ndarray) -> np.ndarray:
    """``float64[N, 4]`` ``[x, y, width, height]`` pixels -> ``[x_min, y_min, x_max, y_max]`` pixels."""
    boxes_xywh = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes_xywh[:, :2], boxes_xywh[:, :2] + boxes_xywh[:, 2:]], axis=1)
