"""ResNet trunk with frozen batch norm, returning the last stage's features and their pixel mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from .config import DetrConfig


class Backbone(nn.Module):
    """torchvision ResNet up to ``layer4`` (C5, stride 32, or 16 with ``dilation``).

    Batch-norm statistics and affine parameters are frozen, as in DETR: detection batches are
    too small to re-estimate them. The stem and ``layer1`` are not trained either.
    """

    def __init__(self, config: DetrConfig) -> None:
        super().__init__()
        resnet = getattr(torchvision.models, config.backbone)(
            weights=None,
            replace_stride_with_dilation=[False, False, config.dilation],
            norm_layer=FrozenBatchNorm2d,
        )
        for name, parameter in resnet.named_parameters():
            if not name.startswith(("layer2", "layer3", "layer4")):
                parameter.requires_grad_(False)
        self.body = IntermediateLayerGetter(resnet, return_layers={"layer4": "0"})
        self.num_channels = config.backbone_channels

    def forward(self, pixel_values: Tensor, pixel_mask: Tensor) -> tuple[Tensor, Tensor]:
        """
        Args:
            pixel_values: Tensor[B, 3, H, W], normalized images.
            pixel_mask: bool Tensor[B, H, W], True on real (non-padding) pixels.
        Returns:
            features Tensor[B, C5, h, w] and bool mask Tensor[B, h, w] (True on real positions).
        """
        features = self.body(pixel_values)["0"]
        # Nearest-neighbour downsampling of the mask, as DETR does.
        mask = F.interpolate(pixel_mask[:, None].float(), size=features.shape[-2:])[:, 0].to(torch.bool)
        return features, mask
