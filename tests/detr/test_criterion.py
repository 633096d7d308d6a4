"""SetCriterion against transformers' DETR loss, plus gradients, eos_coef and distributed box normalization."""

from __future__ import annotations

import datetime
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import transformers
from transformers.loss import loss_for_object_detection as reference

from detr.criterion import DEFAULT_LOSS_WEIGHTS, SetCriterion, weighted_total
from detr.matcher import HungarianMatcher

NUM_CLASSES = 6
NUM_QUERIES = 10


def random_batch(
    num_targets: list[int], seed: int, num_aux: int = 0, requires_grad: bool = False
) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """Continuous random predictions (last layer plus num_aux earlier ones) and targets, boxes normalized cxcywh."""
    gen = torch.Generator().manual_seed(seed)

    def boxes(*shape: int) -> torch.Tensor:  # centres in [0.2, 0.8], sides in [0.05, 0.4]: inside the image
        centres = 0.2 + 0.6 * torch.rand(*shape, 2, generator=gen)
        return torch.cat([centres, 0.05 + 0.35 * torch.rand(*shape, 2, generator=gen)], -1)

    batch = len(num_targets)
    layers = [
        {
            "pred_logits": torch.randn(batch, NUM_QUERIES, NUM_CLASSES + 1, generator=gen).requires_grad_(
                requires_grad
            ),
            "pred_boxes": boxes(batch, NUM_QUERIES).requires_grad_(requires_grad),
        }
        for _ in range(num_aux + 1)
    ]
    outputs = {**layers[-1], "aux_outputs": layers[:-1]} if num_aux else layers[0]
    targets = [{"labels": torch.randint(0, NUM_CLASSES, (n,), generator=gen), "boxes": boxes(n)} for n in num_targets]
    return outputs, targets


def to_transformers(outputs: dict, targets: list[dict]) -> tuple[dict, list[dict]]:
    """The same batch under transformers' key names."""
    theirs = {"logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
    if "aux_outputs" in outputs:
        theirs["auxiliary_outputs"] = [
            {"logits": a["pred_logits"], "pred_boxes": a["pred_boxes"]} for a in outputs["aux_outputs"]
        ]
    return theirs, [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]


@pytest.mark.parametrize("seed", range(3))
def test_losses_and_gradients_match_transformers_image_loss(seed: int) -> None:
    outputs, targets = random_batch([3, 0, 8, 1], seed=seed, num_aux=2, requires_grad=True)
    ours = SetCriterion(NUM_CLASSES, HungarianMatcher(1, 5, 2), eos_coef=0.1)(outputs, targets)
    their_criterion = reference.ImageLoss(
        reference.HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2), NUM_CLASSES, 0.1, ["labels", "boxes"]
    )
    theirs = their_criterion(*to_transformers(outputs, targets))

    expected_keys = {f"{k}{s}" for k in ("loss_ce", "loss_bbox", "loss_giou") for s in ("", "_0", "_1")}
    assert set(ours) == set(theirs) == expected_keys
    for key in expected_keys:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=key)

    leaves = [t for layer in [outputs, *outputs["aux_outputs"]] for t in (layer["pred_logits"], layer["pred_boxes"])]
    our_grads = torch.autograd.grad(weighted_total(ours), leaves)
    their_grads = torch.autograd.grad(weighted_total(theirs), leaves)
    for mine, other in zip(our_grads, their_grads):
        torch.testing.assert_close(mine, other, rtol=0, atol=1e-6)


def test_weighted_total_matches_transformers_detection_loss() -> None:
    outputs, targets = random_batch([2, 5, 0], seed=7, num_aux=2)
    config = transformers.DetrConfig(num_labels=NUM_CLASSES, auxiliary_loss=True, decoder_layers=3)
    layers = [*outputs["aux_outputs"], outputs]
    their_total, their_losses, _ = reference.ForObjectDetectionLoss(
        outputs["pred_logits"],
        to_transformers(outputs, targets)[1],
        "cpu",
        outputs["pred_boxes"],
        config,
        outputs_class=torch.stack([layer["pred_logits"] for layer in layers]),  # [L, B, Q, K+1]
        outputs_coord=torch.stack([layer["pred_boxes"] for layer in layers]),  # [L, B, Q, 4]
    )
    criterion = SetCriterion(NUM_CLASSES, HungarianMatcher(config.class_cost, config.bbox_cost, config.giou_cost))
    ours = criterion(outputs, targets)
    weights = {"loss_ce": 1, "loss_bbox": config.bbox_loss_coefficient, "loss_giou": config.giou_loss_coefficient}
    assert weights == dict(DEFAULT_LOSS_WEIGHTS)
    torch.testing.assert_close(weighted_total(ours), their_total, rtol=0, atol=1e-5)
    assert set(ours) == set(their_losses) - {"cardinality_error"} - {f"cardinality_error_{i}" for i in range(2)}


def test_weighted_total_uses_the_base_name_weight() -> None:
    losses = {"loss_ce": torch.tensor(1.5), "loss_bbox_3": torch.tensor(2.0), "loss_giou_0": torch.tensor(0.25)}
    total = weighted_total(losses, {"loss_ce": 2.0, "loss_bbox": 3.0, "loss_giou": 4.0})
    assert total.item() == pytest.approx(1.5 * 2 + 2.0 * 3 + 0.25 * 4)
    with pytest.raises(ValueError, match="loss_mask_1"):
        weighted_total({"loss_mask_1": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="no loss terms"):
        weighted_total({})


def test_gradient_reaches_logits_and_boxes() -> None:
    outputs, targets = random_batch([2, 4], seed=3, requires_grad=True)
    weighted_total(SetCriterion(NUM_CLASSES, HungarianMatcher())(outputs, targets)).backward()
    for name in ("pred_logits", "pred_boxes"):
        grad = outputs[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_eos_coef_weights_the_no_object_class() -> None:
    outputs, targets = random_batch([2, 3], seed=5)
    matcher = HungarianMatcher()
    target_classes = torch.full((2, NUM_QUERIES), NUM_CLASSES)  # [B, Q]
    for b, (pred_idx, tgt_idx) in enumerate(matcher(outputs, targets)):
        target_classes[b, pred_idx] = targets[b]["labels"][tgt_idx]
    per_query = F.cross_entropy(outputs["pred_logits"].flatten(0, 1), target_classes.flatten(), reduction="none")
    for eos_coef in (0.1, 0.5, 1.0):
        weight = torch.where(target_classes.flatten() == NUM_CLASSES, eos_coef, 1.0)  # [B*Q]
        expected = (weight * per_query).sum() / weight.sum()
        criterion = SetCriterion(NUM_CLASSES, matcher, eos_coef=eos_coef)
        assert "empty_weight" in dict(criterion.named_buffers())
        torch.testing.assert_close(criterion(outputs, targets)["loss_ce"], expected)
    # With every query unmatched, all weights are equal and eos_coef cancels out of the weighted mean.
    empty_outputs, empty_targets = random_batch([0, 0], seed=5)
    no_objects = [SetCriterion(NUM_CLASSES, matcher, eos_coef=c)(empty_outputs, empty_targets) for c in (0.1, 1.0)]
    torch.testing.assert_close(no_objects[0]["loss_ce"], no_objects[1]["loss_ce"])
    assert no_objects[0]["loss_bbox"].item() == no_objects[0]["loss_giou"].item() == 0.0


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda o, t: o.update(pred_logits=o["pred_logits"][..., :-1]), "has 6 classes, expected num_classes"),
        (lambda o, t: o["aux_outputs"][1].pop("pred_logits"), r"outputs\['aux_outputs'\]\[1\] needs a 'pred_logits'"),
        (lambda o, t: t.append(t[0]), "3 targets for a batch of 2"),
        (lambda o, t: t[1].update(boxes=t[1]["boxes"][:, :3]), r"targets\[1\]\['boxes'\] must be \[N, 4\]"),
    ],
)
def test_bad_inputs_raise_value_error(corrupt, message: str) -> None:
    outputs, targets = random_batch([1, 2], seed=0, num_aux=2)
    corrupt(outputs, targets)
    with pytest.raises(ValueError, match=message):
        SetCriterion(NUM_CLASSES, HungarianMatcher())(outputs, targets)


def test_bad_constructor_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="num_classes must be at least 1, got 0"):
        SetCriterion(0, HungarianMatcher())
    with pytest.raises(ValueError, match="eos_coef must be positive, got 0"):
        SetCriterion(NUM_CLASSES, HungarianMatcher(), eos_coef=0)


# Per-rank target counts: unequal, so a missing all_reduce or a missing division by world size changes the losses.
RANK_TARGETS = [[5, 0, 2], [1, 0, 0]]


def _distributed_worker(rank: int, port: int, result_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo0" if sys.platform == "darwin" else "lo"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=len(RANK_TARGETS),
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        outputs, targets = random_batch(RANK_TARGETS[rank], seed=rank, num_aux=1)
        losses = SetCriterion(NUM_CLASSES, HungarianMatcher())(outputs, targets)
        torch.save({k: v.detach() for k, v in losses.items()}, Path(result_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_box_count_is_averaged_across_distributed_workers(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_distributed_worker, args=(port, str(tmp_path)), nprocs=len(RANK_TARGETS), join=True)

    boxes_per_worker = max(sum(map(sum, RANK_TARGETS)) / len(RANK_TARGETS), 1)
    for rank, num_targets in enumerate(RANK_TARGETS):
        outputs, targets = random_batch(num_targets, seed=rank, num_aux=1)
        local = SetCriterion(NUM_CLASSES, HungarianMatcher())(outputs, targets)  # normalized by its own count
        rescale = max(sum(num_targets), 1) / boxes_per_worker
        distributed = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(distributed) == set(local)
        for key, value in local.items():
            expected = value.detach() * rescale if key.startswith(("loss_bbox", "loss_giou")) else value.detach()
            torch.testing.assert_close(distributed[key], expected, msg=key)
