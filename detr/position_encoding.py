"""2-D sine position encoding, normalized by the mask so that padding does not shift it."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """The "Attention is all you need" sine encoding, generalized to images as in DETR.

    Each position gets ``num_pos_feats`` channels for y followed by ``num_pos_feats`` for x.
    Coordinates are the cumulative count of real pixels along each axis, scaled to
    ``[0, 2*pi]`` by the real extent of that row/column, so an image's encoding does not
    depend on how much padding the batch added.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = 2 * math.pi

    def forward(self, mask: Tensor) -> Tensor:
        """
        Args:
            mask: bool Tensor[B, h, w], True on real positions.
        Returns:
            Tensor[B, 2 * num_pos_feats, h, w] (float32).
        """
        y_embed = mask.cumsum(1, dtype=torch.float32)  # (B, h, w)
        x_embed = mask.cumsum(2, dtype=torch.float32)
        eps = 1e-6
        y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)

        pos_x = x_embed[:, :, :, None] / dim_t  # (B, h, w, F)
        pos_y = y_embed[:, :, :, None] / dim_t
        # Interleave sin on even channels and cos on odd ones: (B, h, w, F/2, 2) -> (B, h, w, F)
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # (B, 2F, h, w)
