"""ResNet trunk with frozen batch norm, returning the last stage's features and their pixel mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

from .config import DetrConfig

# torchvision's block type and blocks per stage for each trunk DETR can use.
_RESNETS = {
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
    "resnet101": ("bottleneck", [3, 4, 23, 3]),
}


def conv_frozen_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(conv(x))`` for a frozen batch norm, computed as one convolution with scaled weights and a bias.

    A frozen norm is a per-channel affine map, so it folds exactly into the convolution before it;
    doing so saves the norm's elementwise passes over the activations, forward and backward. With
    gradients on, the fold is recomputed on every call (the convolution's weights still train);
    without them (``torch.inference_mode()``, ``torch.no_grad()``) the folded weights are kept
    and reused until a weight or statistic changes. Any other ``norm`` (an ``nn.Identity`` of a
    model folded by hand) leaves the convolution as it is.
    """
    if not isinstance(norm, FrozenBatchNorm2d):
        return _convolve(conv, x, conv.weight, conv.bias)
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return _convolve(conv, x, *fold_frozen_norm(conv, norm))
    return _convolve(conv, x, *_kept_fold(conv, norm))


def fold_frozen_norm(conv: nn.Conv2d, norm: FrozenBatchNorm2d) -> tuple[Tensor, Tensor]:
    """The weight Tensor[C_out, C_in, k, k] and bias Tensor[C_out] of ``norm(conv(.))`` as one convolution."""
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()  # [C_out]
    bias = norm.bias - norm.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv.weight * scale[:, None, None, None], bias


# Attribute of a convolution holding its kept fold: a plain attribute, so never in the state dict.
_KEPT_FOLD = "_frozen_norm_fold"


def _kept_fold(conv: nn.Conv2d, norm: FrozenBatchNorm2d) -> tuple[Tensor, Tensor]:
    """:func:`fold_frozen_norm`, computed once and kept on ``conv`` while its inputs stay as they were.

    A tensor's identity here is its storage, dtype, device and version counter, which every
    in-place change bumps (``load_state_dict``, an optimizer step, ``.copy_()``); ``.to()`` and
    ``.half()`` give new storage. The kept weight is channels-last, the layout oneDNN and cuDNN
    convolve fastest (benchmarks/RESULTS.md).
    """
    inputs = (conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var)
    if any(t is not None and t.is_inference() for t in inputs):  # no version counter: cannot tell changes
        return fold_frozen_norm(conv, norm)
    key = tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device) for t in inputs)
    kept = conv.__dict__.get(_KEPT_FOLD)
    if kept is None or kept[0] != key:
        weight, bias = fold_frozen_norm(conv, norm)
        kept = (key, weight.contiguous(memory_format=torch.channels_last), bias)
        conv.__dict__[_KEPT_FOLD] = kept
    return kept[1], kept[2]


def forget_kept_folds(module: nn.Module) -> None:
    """Drop the folded weights :func:`conv_frozen_norm` kept under ``module`` (memory, before training)."""
    for child in module.modules():
        child.__dict__.pop(_KEPT_FOLD, None)


def _convolve(conv: nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``conv``'s convolution with the given weights.

    On CPU a 1x1, stride-1 convolution is given dilation 2: one kernel tap has no neighbours to
    spread, so the result is the same, but PyTorch then runs it with oneDNN, which it otherwise
    skips for 1x1 convolutions on one thread (a Ray worker with one CPU) in favour of a slower
    BLAS path (figures in benchmarks/RESULTS.md). GPUs keep the convolution as it is.
    """
    dilation = conv.dilation
    if x.device.type == "cpu" and conv.kernel_size == (1, 1) and conv.stride == (1, 1):
        dilation = (2, 2)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, dilation, conv.groups)


class FrozenNormBasicBlock(BasicBlock):
    """torchvision's ``BasicBlock`` (same parameters and names) with its norms folded by :func:`conv_frozen_norm`."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(conv_frozen_norm(self.conv1, self.bn1, x))
        out = conv_frozen_norm(self.conv2, self.bn2, out)
        out += _shortcut(self.downsample, x)  # in place, as torchvision does: no new activation-sized tensor
        return self.relu(out)


class FrozenNormBottleneck(Bottleneck):
    """torchvision's ``Bottleneck`` (same parameters and names) with its norms folded by :func:`conv_frozen_norm`."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(conv_frozen_norm(self.conv1, self.bn1, x))
        out = self.relu(conv_frozen_norm(self.conv2, self.bn2, out))
        out = conv_frozen_norm(self.conv3, self.bn3, out)
        out += _shortcut(self.downsample, x)  # in place, as torchvision does: no new activation-sized tensor
        return self.relu(out)


def _shortcut(downsample: nn.Sequential | None, x: Tensor) -> Tensor:
    """The residual branch: ``x``, or the ``Sequential(conv, norm)`` projection of it."""
    return x if downsample is None else conv_frozen_norm(downsample[0], downsample[1], x)


class FrozenNormTrunk(IntermediateLayerGetter):
    """A torchvision ResNet's stem and four stages (its ``conv1``, ``bn1``, ``layer1``-``layer4``
    names, so checkpoints load unchanged), the stem's frozen norm folded like the blocks'.

    Call as ``trunk(pixel_values)``: ``{"0": C5 features}``, as ``IntermediateLayerGetter`` returns.
    """

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.maxpool(self.relu(conv_frozen_norm(self.conv1, self.bn1, x)))
        return {"0": self.layer4(self.layer3(self.layer2(self.layer1(x))))}


class Backbone(nn.Module):
    """torchvision ResNet up to ``layer4`` (C5, stride 32, or 16 with ``dilation``).

    Batch-norm statistics and affine parameters are frozen, as in DETR: detection batches are
    too small to re-estimate them. The stem and ``layer1`` are not trained either. The stem and
    the residual blocks are torchvision's with a forward pass that folds those norms into their
    convolutions (:func:`conv_frozen_norm`): same parameter names, so checkpoints load unchanged,
    same results. Images go through it channels-last, the layout oneDNN (CPU) and cuDNN (GPU)
    convolve fastest; the parameters keep their usual layout.
    """

    def __init__(self, config: DetrConfig) -> None:
        super().__init__()
        block, layers = _RESNETS[config.backbone]
        resnet = ResNet(
            FrozenNormBottleneck if block == "bottleneck" else FrozenNormBasicBlock,
            layers,
            replace_stride_with_dilation=[False, False, config.dilation],
            norm_layer=FrozenBatchNorm2d,
        )
        for name, parameter in resnet.named_parameters():
            if not name.startswith(("layer2", "layer3", "layer4")):
                parameter.requires_grad_(False)
        self.body = FrozenNormTrunk(resnet, return_layers={"layer4": "0"})
        self.num_channels = config.backbone_channels

    def forward(self, pixel_values: Tensor, pixel_mask: Tensor) -> tuple[Tensor, Tensor]:
        """
        Args:
            pixel_values: Tensor[B, 3, H, W], normalized images.
            pixel_mask: bool Tensor[B, H, W], True on real (non-padding) pixels.
        Returns:
            features Tensor[B, C5, h, w] (channels-last memory) and bool mask Tensor[B, h, w]
            (True on real positions).
        """
        features = self.body(pixel_values.contiguous(memory_format=torch.channels_last))["0"]
        # Nearest-neighbour downsampling of the mask, as DETR does.
        mask = F.interpolate(pixel_mask[:, None].float(), size=features.shape[-2:])[:, 0].to(torch.bool)
        return features, mask

    def train(self, mode: bool = True) -> Backbone:
        if mode:  # weights about to change: the folds kept for inference would only hold memory
            forget_kept_folds(self)
        return super().train(mode)
