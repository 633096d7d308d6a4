"""HungarianMatcher against brute force, against itself image by image, and against transformers' DETR matcher."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers.loss import loss_for_object_detection as reference

from detr.matcher import HungarianMatcher


def random_batch(
    num_targets: list[int], num_queries: int, num_classes: int, seed: int
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Continuous random predictions and targets (so optimal assignments have no ties), boxes normalized cxcywh."""
    gen = torch.Generator().manual_seed(seed)

    def boxes(n: int) -> torch.Tensor:  # centres in [0.2, 0.8], sides in [0.05, 0.4]: inside the image
        centres = 0.2 + 0.6 * torch.rand(n, 2, generator=gen)
        return torch.cat([centres, 0.05 + 0.35 * torch.rand(n, 2, generator=gen)], 1)

    batch = len(num_targets)
    outputs = {
        "pred_logits": torch.randn(batch, num_queries, num_classes + 1, generator=gen),
        "pred_boxes": boxes(batch * num_queries).view(batch, num_queries, 4),
    }
    targets = [{"labels": torch.randint(0, num_classes, (n,), generator=gen), "boxes": boxes(n)} for n in num_targets]
    return outputs, targets


def scalar_giou(a: list[float], b: list[float]) -> float:
    """GIoU of two cxcywh boxes, written out by hand so the check does not share code with the matcher."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


@pytest.mark.parametrize("weights", [(1, 5, 2), (1, 0, 0), (0, 1, 0), (0, 0, 1)])
@pytest.mark.parametrize(("num_queries", "num_targets"), [(6, 4), (4, 4), (3, 5)])
def test_matches_brute_force(weights: tuple[float, float, float], num_queries: int, num_targets: int) -> None:
    outputs, targets = random_batch([num_targets], num_queries, num_classes=5, seed=num_queries * 10 + num_targets)
    # Distinct labels: with the class cost alone, two targets of one class would tie.
    targets[0]["labels"] = torch.randperm(5, generator=torch.Generator().manual_seed(0))[:num_targets]
    w_class, w_bbox, w_giou = weights
    prob = outputs["pred_logits"][0].softmax(-1).tolist()
    pred, tgt, labels = outputs["pred_boxes"][0].tolist(), targets[0]["boxes"].tolist(), targets[0]["labels"].tolist()
    cost = [
        [
            -w_class * prob[q][labels[t]]
            + w_bbox * sum(abs(x - y) for x, y in zip(pred[q], tgt[t]))
            - w_giou * scalar_giou(pred[q], tgt[t])
            for t in range(num_targets)
        ]
        for q in range(num_queries)
    ]
    # Every injective map from the smaller side into the larger one.
    if num_queries >= num_targets:
        chosen_queries = itertools.permutations(range(num_queries), num_targets)
        candidates = [{q: t for t, q in enumerate(qs)} for qs in chosen_queries]
    else:
        candidates = [dict(enumerate(ts)) for ts in itertools.permutations(range(num_targets), num_queries)]
    best = min(candidates, key=lambda m: sum(cost[q][t] for q, t in m.items()))

    pred_idx, tgt_idx = HungarianMatcher(*weights)(outputs, targets)[0]
    found = dict(zip(pred_idx.tolist(), tgt_idx.tolist()))
    assert len(found) == min(num_queries, num_targets)
    total_found, total_best = (sum(cost[q][t] for q, t in m.items()) for m in (found, best))
    assert math.isclose(total_found, total_best, abs_tol=1e-5)
    assert found == best


def test_batched_call_equals_one_image_at_a_time() -> None:
    outputs, targets = random_batch([3, 0, 7, 1], num_queries=12, num_classes=9, seed=1)
    matcher = HungarianMatcher()
    batched = matcher(outputs, targets)
    assert len(batched) == 4
    for b, (pred_idx, tgt_idx) in enumerate(batched):
        single = {k: v[b : b + 1] for k, v in outputs.items()}
        one_pred, one_tgt = matcher(single, [targets[b]])[0]
        assert pred_idx.dtype == tgt_idx.dtype == torch.int64
        assert torch.equal(pred_idx, one_pred) and torch.equal(tgt_idx, one_tgt)
        assert len(pred_idx) == len(targets[b]["labels"])


@pytest.mark.parametrize("seed", range(4))
def test_matches_transformers_matcher(seed: int) -> None:
    outputs, targets = random_batch([4, 0, 9, 2, 15], num_queries=20, num_classes=7, seed=seed)
    ours = HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2)(outputs, targets)
    theirs = reference.HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)(
        {"logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]},
        [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets],
    )
    assert len(ours) == len(theirs)
    for (our_pred, our_tgt), (their_pred, their_tgt) in zip(ours, theirs):
        assert torch.equal(our_pred, their_pred) and torch.equal(our_tgt, their_tgt)


def test_empty_targets_give_empty_int64_indices() -> None:
    outputs, targets = random_batch([0, 0], num_queries=5, num_classes=3, seed=0)
    for pred_idx, tgt_idx in HungarianMatcher()(outputs, targets):
        assert pred_idx.shape == tgt_idx.shape == (0,)
        assert pred_idx.dtype == tgt_idx.dtype == torch.int64


def test_non_finite_prediction_is_matched_last() -> None:
    outputs, targets = random_batch([2], num_queries=3, num_classes=3, seed=3)
    outputs["pred_boxes"][0, 1] = float("nan")
    pred_idx, _ = HungarianMatcher()(outputs, targets)[0]
    assert pred_idx.tolist() == [0, 2]


def test_cost_is_computed_without_autograd() -> None:
    outputs, targets = random_batch([3], num_queries=4, num_classes=3, seed=0)
    logits, boxes = outputs["pred_logits"][0].requires_grad_(), outputs["pred_boxes"][0].requires_grad_()
    cost = HungarianMatcher().cost_matrix(logits, boxes, targets[0]["labels"], targets[0]["boxes"])
    assert cost.shape == (4, 3) and not cost.requires_grad


def test_all_zero_weights_raise() -> None:
    with pytest.raises(ValueError, match="non-zero cost"):
        HungarianMatcher(cost_class=0, cost_bbox=0, cost_giou=0)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda o, t: t.pop(), "2 targets for a batch of 3"),
        (lambda o, t: t[0].update(boxes=torch.rand(2, 5)), r"targets\[0\]\['boxes'\] must be \[N, 4\]"),
        (lambda o, t: t[1].update(labels=t[1]["labels"].float()), r"targets\[1\]\['labels'\] must be int64"),
        (lambda o, t: t[2].update(labels=torch.tensor([0, 4])), r"must lie in \[0, 4\)"),
        (lambda o, t: t[0].pop("labels"), "needs 'labels' and 'boxes'"),
        (lambda o, t: o.update(pred_boxes=o["pred_boxes"][..., :2]), "pred_boxes must be"),
        (lambda o, t: o.pop("pred_logits"), "missing 'pred_logits'"),
    ],
)
def test_bad_inputs_raise_value_error(corrupt, message: str) -> None:
    outputs, targets = random_batch([2, 1, 2], num_queries=4, num_classes=4, seed=0)
    corrupt(outputs, targets)
    with pytest.raises(ValueError, match=message):
        HungarianMatcher()(outputs, targets)
