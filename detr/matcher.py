"""Hungarian matching of DETR's query predictions to an image's ground-truth boxes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

from detr.config import LossConfig


def check_detection_inputs(outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]) -> None:
    """Raise ValueError naming the first malformed entry of a (predictions, targets) pair.

    Args:
        outputs: ``pred_logits`` Tensor[B, Q, K + 1] and ``pred_boxes`` Tensor[B, Q, 4] (normalized cxcywh).
        targets: B dicts with ``labels`` int64 Tensor[N] in [0, K) and ``boxes`` Tensor[N, 4] (normalized cxcywh).
    """
    for key in ("pred_logits", "pred_boxes"):
        if key not in outputs:
            raise ValueError(f"outputs is missing {key!r}; got keys {sorted(outputs)}")
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    if logits.ndim != 3 or logits.shape[-1] < 2:
        raise ValueError(f"pred_logits must be [B, Q, K+1] with K >= 1, got shape {tuple(logits.shape)}")
    if boxes.shape != (*logits.shape[:2], 4):
        raise ValueError(f"pred_boxes must be [B, Q, 4] = {(*logits.shape[:2], 4)}, got {tuple(boxes.shape)}")
    if len(targets) != logits.shape[0]:
        raise ValueError(f"got {len(targets)} targets for a batch of {logits.shape[0]} predictions")
    num_classes = logits.shape[-1] - 1
    for i, target in enumerate(targets):
        if "labels" not in target or "boxes" not in target:
            raise ValueError(f"targets[{i}] needs 'labels' and 'boxes', got keys {sorted(target)}")
        labels, target_boxes = target["labels"], target["boxes"]
        if labels.ndim != 1 or labels.dtype != torch.int64:
            raise ValueError(f"targets[{i}]['labels'] must be int64 [N], got {labels.dtype} {tuple(labels.shape)}")
        if target_boxes.shape != (labels.shape[0], 4):
            raise ValueError(
                f"targets[{i}]['boxes'] must be [N, 4] with N = {labels.shape[0]} labels, "
                f"got {tuple(target_boxes.shape)}"
            )
        # An out-of-range label would index past the logits: a device-side assert on CUDA, so check it here.
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"targets[{i}]['labels'] must lie in [0, {num_classes}), got {labels.tolist()}")


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to targets that minimises the summed matching cost.

    For query q and target box t the cost is

        C[q, t] = cost_class * (-p_q(class_t))
                + cost_bbox * L1(box_q, box_t)        # on normalized cxcywh
                + cost_giou * (-GIoU(box_q, box_t))   # on xyxy

    where p_q is the softmax over the K + 1 logits of query q. Queries left unmatched are meant to predict
    "no object". Each image's [Q, N] cost block is built and solved on its own rather than as one
    batch-wide [B * Q, sum N] matrix, which would spend B times the memory on cross-image pairs never used.

    Args:
        cost_class: weight of the negated class probability.
        cost_bbox: weight of the L1 distance between normalized cxcywh boxes.
        cost_giou: weight of the negated generalized IoU.
    """

    def __init__(
        self,
        cost_class: float = LossConfig.cost_class,
        cost_bbox: float = LossConfig.cost_bbox,
        cost_giou: float = LossConfig.cost_giou,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher needs at least one non-zero cost weight, got all zeros")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    @torch.no_grad()
    def cost_matrix(self, logits: Tensor, boxes: Tensor, labels: Tensor, target_boxes: Tensor) -> Tensor:
        """Matching cost of one image.

        Args:
            logits: Tensor[Q, K + 1] class logits, the last class being "no object".
            boxes: Tensor[Q, 4] predicted boxes, normalized cxcywh.
            labels: int64 Tensor[N] target classes.
            target_boxes: Tensor[N, 4] target boxes, normalized cxcywh.

        Returns:
            Tensor[Q, N] cost, float32 or wider.
        """
        prob = logits.float().softmax(-1)  # [Q, K+1]
        boxes, target_boxes = boxes.float(), target_boxes.float()
        class_cost = -prob[:, labels]  # [Q, N]; 1 - p would only add a constant
        bbox_cost = torch.cdist(boxes, target_boxes, p=1)  # [Q, N]
        giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy"))
        cost = self.cost_class * class_cost + self.cost_bbox * bbox_cost + self.cost_giou * -giou
        # NaN/inf from degenerate boxes would make scipy refuse the matrix; as the largest finite cost
        # such pairs are only matched when nothing else is left.
        big = torch.finfo(cost.dtype).max
        return torch.nan_to_num(cost, nan=big, posinf=big, neginf=big)

    @torch.no_grad()
    def forward(
        self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]
    ) -> list[tuple[Tensor, Tensor]]:
        """Match every image of a batch.

        Args:
            outputs: ``pred_logits`` Tensor[B, Q, K + 1] and ``pred_boxes`` Tensor[B, Q, 4] (normalized cxcywh).
            targets: B dicts with ``labels`` int64 Tensor[N_b] and ``boxes`` Tensor[N_b, 4] (normalized cxcywh);
                N_b = 0 is allowed.

        Returns:
            B pairs (pred_idx, tgt_idx) of int64 CPU Tensor[min(Q, N_b)]: query pred_idx[j] is matched to
            target tgt_idx[j]; pred_idx is sorted ascending.
        """
        check_detection_inputs(outputs, targets)
        indices = []
        for logits, boxes, target in zip(outputs["pred_logits"], outputs["pred_boxes"], targets):
            cost = self.cost_matrix(logits, boxes, target["labels"], target["boxes"])
            pred_idx, tgt_idx = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(pred_idx, dtype=torch.int64), torch.as_tensor(tgt_idx, dtype=torch.int64)))
        return indices
