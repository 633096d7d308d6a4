"""Kept for code written against earlier releases: the model is fast for inference as it is."""

from __future__ import annotations

import warnings

from .model import DETR


def optimize_for_inference(model: DETR) -> DETR:
    """``model`` itself, in eval mode.

    Earlier releases returned a copy with the frozen batch norms folded into the convolutions and
    channels-last weights. Every :class:`DETR` now does both on its own - the backbone folds the
    norms and keeps the folded weights while gradients are off, and convolves channels-last
    (:mod:`detr.backbone`) - with its state dict unchanged, so ``detr.from_pretrained(...)`` is the
    fast model without this call. Deprecated: call ``model.eval()``.
    """
    warnings.warn(
        "detr.optimize_for_inference is no longer needed: models are fast for inference as they are; use model.eval()",
        DeprecationWarning,
        stacklevel=2,
    )
    return model.eval()
