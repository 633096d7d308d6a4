"""Preparing a trained DETR for fast inference without changing what it computes."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from .model import DETR


def optimize_for_inference(model: DETR) -> DETR:
    """An eval-mode copy with frozen batch norm folded into the convolutions and channels-last
    memory for the backbone (measured in ``benchmarks/bench_model.py``). Outputs equal the
    original's up to float rounding; the copy is for inference only (its state dict differs)."""
    model = copy.deepcopy(model).eval()
    for module in list(model.backbone.modules()):
        _fold_children(module)
    return model.to(memory_format=torch.channels_last)


def _fold_children(parent: nn.Module) -> None:
    """Fold each ``bnX`` into its sibling ``convX`` (ResNet blocks and stem) and each
    ``Sequential(conv, bn)`` (downsample branches)."""
    children = dict(parent.named_children())
    for name, bn in children.items():
        if isinstance(bn, FrozenBatchNorm2d) and name.startswith("bn"):
            conv = children.get("conv" + name[2:])
            if isinstance(conv, nn.Conv2d):
                setattr(parent, "conv" + name[2:], _folded(conv, bn))
                setattr(parent, name, nn.Identity())
    if isinstance(parent, nn.Sequential):
        for i in range(len(parent) - 1):
            if isinstance(parent[i], nn.Conv2d) and isinstance(parent[i + 1], FrozenBatchNorm2d):
                parent[i] = _folded(parent[i], parent[i + 1])
                parent[i + 1] = nn.Identity()


@torch.no_grad()
def _folded(conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> nn.Conv2d:
    """conv followed by y = (x - mean) / sqrt(var + eps) * weight + bias, as one conv with bias."""
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()  # (C_out,)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
    )
    fused.weight.copy_(conv.weight * scale[:, None, None, None])
    conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
    fused.bias.copy_((conv_bias - bn.running_mean) * scale + bn.bias)
    fused.requires_grad_(False)
    return fused
