"""DETR's set-prediction loss: Hungarian matching, then class and box losses on the matched pairs."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

from detr.config import LossConfig
from detr.matcher import HungarianMatcher

# The weights of the original DETR recipe; aux terms reuse their base weight.
DEFAULT_LOSS_WEIGHTS: Mapping[str, float] = MappingProxyType(LossConfig().loss_weights)

_LAYER_SUFFIX = re.compile(r"_\d+$")


def weighted_total(losses: Mapping[str, Tensor], weights: Mapping[str, float] = DEFAULT_LOSS_WEIGHTS) -> Tensor:
    """Sum of each loss term times the weight of its base name (``loss_bbox_3`` takes ``loss_bbox``'s weight).

    Args:
        losses: scalar loss Tensors by name, as returned by SetCriterion.
        weights: weight per base name; every term's base name must be present.
    """
    if not losses:
        raise ValueError("weighted_total got no loss terms")
    total = None
    for name, value in losses.items():
        base = _LAYER_SUFFIX.sub("", name)
        if base not in weights:
            raise ValueError(f"no weight for loss term {name!r} (base name {base!r}); weights: {sorted(weights)}")
        term = value * weights[base]
        total = term if total is None else total + term
    return total


class SetCriterion(nn.Module):
    """Unweighted DETR losses of a batch, for the last decoder layer and each auxiliary one.

    Returns ``loss_ce`` (cross entropy over K + 1 classes; unmatched queries target the no-object class K,
    whose class weight is ``eos_coef``), ``loss_bbox`` (L1 of matched normalized cxcywh boxes) and
    ``loss_giou`` (1 - GIoU of matched boxes). The box losses are divided by the mean number of target
    boxes per worker (summed over ``torch.distributed`` workers when initialized, at least 1). For each
    entry i of ``outputs["aux_outputs"]`` the same three terms follow with suffix ``_i``, re-matched.

    Args:
        num_classes: K, the number of object classes, not counting "no object".
        matcher: assigns queries to targets.
        eos_coef: cross-entropy weight of the no-object class relative to the others.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, eos_coef: float = LossConfig.eos_coef) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if eos_coef <= 0:  # 0 would make a batch without any match a 0/0 cross entropy
            raise ValueError(f"eos_coef must be positive, got {eos_coef}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.eos_coef = eos_coef
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def forward(self, outputs: Mapping[str, object], targets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Compute the loss terms.

        Args:
            outputs: ``pred_logits`` Tensor[B, Q, K + 1], ``pred_boxes`` Tensor[B, Q, 4] (normalized cxcywh),
                optionally ``aux_outputs``: a list of dicts with the same two keys, one per earlier decoder layer.
            targets: B dicts with ``labels`` int64 Tensor[N_b] and ``boxes`` Tensor[N_b, 4] (normalized cxcywh).
        """
        layers = [outputs, *outputs.get("aux_outputs", [])]
        for i, layer in enumerate(layers):
            # The matcher checks shapes and targets; here only what it cannot know: the class count.
            where = "outputs" if i == 0 else f"outputs['aux_outputs'][{i - 1}]"
            logits = layer.get("pred_logits") if isinstance(layer, Mapping) else None
            if not isinstance(logits, Tensor):
                raise ValueError(f"{where} needs a 'pred_logits' Tensor, got {type(logits).__name__}")
            if logits.shape[-1] != self.num_classes + 1:
                raise ValueError(
                    f"{where}['pred_logits'] has {logits.shape[-1]} classes, expected num_classes + 1 = "
                    f"{self.num_classes + 1}"
                )
        num_boxes = self._num_boxes_per_worker(targets, outputs["pred_logits"].device)
        losses = self._layer_losses(outputs, targets, num_boxes)
        for i, aux in enumerate(layers[1:]):
            losses.update({f"{k}_{i}": v for k, v in self._layer_losses(aux, targets, num_boxes).items()})
        return losses

    def _layer_losses(
        self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]], num_boxes: float
    ) -> dict[str, Tensor]:
        indices = self.matcher(outputs, targets)
        logits = outputs["pred_logits"]  # [B, Q, K+1]
        batch_idx = torch.cat([torch.full_like(pred, b) for b, (pred, _) in enumerate(indices)])  # [M]
        pred_idx = torch.cat([pred for pred, _ in indices])  # [M], M = matched pairs in the batch

        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx, pred_idx] = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        # cross_entropy wants the class dimension second: [B, K+1, Q] against [B, Q].
        loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)

        pred_boxes = outputs["pred_boxes"][batch_idx, pred_idx]  # [M, 4] cxcywh
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(pred_boxes)  # [M, 4]
        loss_bbox = F.l1_loss(pred_boxes, target_boxes, reduction="sum") / num_boxes
        giou = generalized_box_iou(  # [M, M]
            box_convert(pred_boxes, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy")
        )
        loss_giou = (1 - torch.diag(giou)).sum() / num_boxes  # diag: the matched pairs of the [M, M] matrix
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    @staticmethod
    def _num_boxes_per_worker(targets: Sequence[Mapping[str, Tensor]], device: torch.device) -> float:
        """Target boxes in the global batch divided by the number of workers, at least 1."""
        num_boxes = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_boxes)  # SUM: every worker then divides by the same global count
            world_size = dist.get_world_size()
        return torch.clamp(num_boxes / world_size, min=1).item()
