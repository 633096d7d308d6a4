"""DETR: backbone + transformer + set-prediction heads."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import Backbone
from .categories import COCO_CATEGORIES, Category
from .config import DetrConfig
from .position_encoding import PositionEmbeddingSine
from .transformer import Transformer


class MLP(nn.Module):
    """A plain multi-layer perceptron with ReLU between layers (the box head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class DETR(nn.Module):
    """DEtection TRansformer.

    Call as ``model(pixel_values, pixel_mask)``; returns a dict with
    ``pred_logits`` Tensor[B, Q, num_classes + 1] (last logit: no object),
    ``pred_boxes`` Tensor[B, Q, 4] (normalized cxcywh) and, in training mode,
    ``aux_outputs``: the same two for each decoder layer but the last.

    ``categories`` maps class index to dataset category id and name; it travels with checkpoints.
    """

    def __init__(self, config: DetrConfig, categories: Sequence[Category] | None = None) -> None:
        super().__init__()
        self.config = config
        self.categories = tuple(categories) if categories is not None else _default_categories(config)
        if len(self.categories) != config.num_classes:
            raise ValueError(
                f"{len(self.categories)} categories given for a model with num_classes={config.num_classes}"
            )
        hidden = config.hidden_dim
        self.backbone = Backbone(config)
        self.position_encoding = PositionEmbeddingSine(hidden // 2, config.position_temperature)
        self.input_proj = nn.Conv2d(config.backbone_channels, hidden, kernel_size=1)
        self.query_embed = nn.Embedding(config.num_queries, hidden)
        self.transformer = Transformer(config)
        self.class_embed = nn.Linear(hidden, config.num_classes + 1)
        self.bbox_embed = MLP(hidden, hidden, 4, 3)

    def forward(self, pixel_values: Tensor, pixel_mask: Tensor) -> dict:
        """
        Args:
            pixel_values: float Tensor[B, 3, H, W], ImageNet-normalized, padded bottom-right.
            pixel_mask: bool Tensor[B, H, W], True on real pixels.
        """
        _check_inputs(pixel_values, pixel_mask)
        features, mask = self.backbone(pixel_values, pixel_mask)  # (B, C5, h, w), (B, h, w)
        pos = self.position_encoding(mask)  # (B, hidden, h, w)
        hs = self.transformer(self.input_proj(features), mask, self.query_embed.weight, pos, self.training)
        logits = self.class_embed(hs)  # (L, B, Q, K + 1)
        boxes = self.bbox_embed(hs).sigmoid()  # (L, B, Q, 4)
        outputs = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.training:
            outputs["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return outputs


def _default_categories(config: DetrConfig) -> tuple[Category, ...]:
    if config.num_classes == len(COCO_CATEGORIES):
        return COCO_CATEGORIES
    return tuple(Category(i, f"class_{i}") for i in range(config.num_classes))


def _check_inputs(pixel_values: Tensor, pixel_mask: Tensor) -> None:
    if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
        raise ValueError(f"pixel_values must be a float Tensor[B, 3, H, W], got {shape}")
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values must be floating point (normalized), got {pixel_values.dtype}")
    if not isinstance(pixel_mask, Tensor) or pixel_mask.dtype != torch.bool:
        got = pixel_mask.dtype if isinstance(pixel_mask, Tensor) else type(pixel_mask).__name__
        raise ValueError(f"pixel_mask must be a bool Tensor[B, H, W] (True on real pixels), got {got}")
    b, _, h, w = pixel_values.shape
    if tuple(pixel_mask.shape) != (b, h, w):
        raise ValueError(
            f"pixel_mask shape {tuple(pixel_mask.shape)} does not match pixel_values: expected {(b, h, w)}"
        )
