"""Comparing the job's detections with the model called directly on the same image."""

from __future__ import annotations

import numpy as np
import torch

import detr
from detr.image_decoding import decode_image


def direct_detections(model, data: bytes, threshold: float = 0.01) -> list[dict]:
    """The model called directly on one image, with the job's decoding and resize rule."""
    batch = detr.preprocess([decode_image(data)], 128, 192)
    with torch.inference_mode():
        outputs = model(batch.pixel_values, batch.pixel_mask)
    return detr.detection_records(detr.postprocess(outputs, batch.original_sizes, threshold)[0], model.categories)


def assert_same_detections(actual: list[dict], expected: list[dict]) -> None:
    assert len(actual) == len(expected)
    unmatched = list(actual)
    for want in expected:
        match = next(
            (
                got
                for got in unmatched
                if got["category_id"] == want["category_id"]
                and abs(got["score"] - want["score"]) < 1e-4
                and np.allclose(got["box"], want["box"], rtol=1e-4, atol=1e-3)
            ),
            None,
        )
        assert match is not None, f"no match for {want}"
        unmatched.remove(match)
