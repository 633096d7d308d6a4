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


def assert_close_detections(
    actual: list[dict], expected: list[dict], *, threshold: float, score_tol: float, box_tol_px: float
) -> int:
    """Two runs' detections of one image agree within a numeric tolerance (another device or precision).

    A detection whose score lies within ``score_tol`` of ``threshold`` may be kept by one run and not the
    other; every detection scoring above ``threshold + score_tol`` in either run must have a partner in the
    other with the same category, a score within ``score_tol`` and every box coordinate within
    ``box_tol_px`` pixels. Returns how many detections were matched.
    """
    unmatched = list(actual)
    matched = 0
    for want in expected:
        match = next(
            (
                got
                for got in unmatched
                if got["category_id"] == want["category_id"]
                and abs(got["score"] - want["score"]) <= score_tol
                and np.abs(np.subtract(got["box"], want["box"])).max() <= box_tol_px
            ),
            None,
        )
        if match is not None:
            unmatched.remove(match)
            matched += 1
        else:
            assert want["score"] <= threshold + score_tol, f"no match for {want}"
    stray = [got for got in unmatched if got["score"] > threshold + score_tol]
    assert not stray, f"detections without a partner: {stray[:3]}"
    return matched
