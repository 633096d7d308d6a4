"""Numeric precision of a forward pass: the names users pass and the autocast dtype they mean."""

from __future__ import annotations

import torch

from .config import PRECISIONS

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype ``precision`` means on ``device``.

    ``auto`` is fp32 on CPU (autocast there is slower for DETR's convolutions) and bf16 on GPUs
    that support it, fp16 otherwise; bf16's range avoids fp16 overflow in attention.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return _DTYPES[precision]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(precision: str, device: torch.device) -> torch.autocast | None:
    """An autocast context for ``precision`` on ``device``, or None for plain fp32."""
    dtype = autocast_dtype(precision, device)
    return None if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
