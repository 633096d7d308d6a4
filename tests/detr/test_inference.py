"""The model detr.from_pretrained returns is the fast one for inference, and still an ordinary model:
same state dict, fine-tunable, savable, wrappable in DDP."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import detr
from detr.backbone import _KEPT_FOLD

from checkpoints import randomize_


def _batch(seed: int = 0, count: int = 2) -> detr.ImageBatch:
    generator = torch.Generator().manual_seed(seed)
    sizes = [(96, 128), (128, 96), (112, 112)][:count]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in sizes]
    return detr.preprocess(images, min_size=96, max_size=128)


def _outputs(model: detr.DETR, batch: detr.ImageBatch) -> dict:
    with torch.inference_mode():
        return model(batch.pixel_values, batch.pixel_mask)


def _kept_folds(model: torch.nn.Module) -> int:
    return sum(_KEPT_FOLD in module.__dict__ for module in model.modules())


def test_fast_path_matches_transformers_without_any_other_call(reference_r50):
    reference, hub_file, _ = reference_r50
    model = detr.from_pretrained(str(hub_file))
    batch = _batch()
    with torch.inference_mode():
        expected = reference(pixel_values=batch.pixel_values, pixel_mask=batch.pixel_mask.long()).logits
        first = model(batch.pixel_values, batch.pixel_mask)["pred_logits"]
        again = model(batch.pixel_values, batch.pixel_mask)["pred_logits"]  # the kept folds, reused
    assert _kept_folds(model) == 53, "R50: the stem, 48 block convolutions and 4 shortcut convolutions"
    scale = expected.abs().max()
    assert ((first - expected).abs().max() / scale) <= 1e-4
    assert torch.equal(first, again)
    with torch.no_grad():  # kept folds made under inference_mode, used outside it
        assert torch.equal(model(batch.pixel_values, batch.pixel_mask)["pred_logits"], first)
    tracked = model(batch.pixel_values, batch.pixel_mask)["pred_logits"]  # gradients on: folded afresh
    assert tracked.requires_grad and ((tracked.detach() - expected).abs().max() / scale) <= 1e-4


def test_state_dict_is_unchanged_by_inference(tiny_checkpoint):
    model = detr.from_pretrained(tiny_checkpoint)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _outputs(model, _batch())
    assert _kept_folds(model) > 0
    after = model.state_dict()
    assert after.keys() == before.keys() == detr.DETR(model.config).state_dict().keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(v.is_contiguous() for v in after.values()), "parameters keep their usual layout"


def test_kept_folds_follow_the_weights(tiny_checkpoint):
    """Weights changed in place, replaced by load_state_dict or converted: outputs follow, as a
    freshly built model with the same weights gives them."""
    model = detr.from_pretrained(tiny_checkpoint)
    batch = _batch()
    original = _outputs(model, batch)["pred_logits"]
    other = detr.DETR(model.config)
    randomize_(other, seed=5)
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(_outputs(model, batch)["pred_logits"], _outputs(other.eval(), batch)["pred_logits"])
    with torch.no_grad():
        model.backbone.body.layer1[0].bn1.running_var.mul_(4)  # a statistic, in place
        other.backbone.body.layer1[0].bn1.running_var.mul_(4)
    torch.testing.assert_close(_outputs(model, batch)["pred_logits"], _outputs(other, batch)["pred_logits"])
    model.double()
    with torch.inference_mode():
        doubled = model(batch.pixel_values.double(), batch.pixel_mask)["pred_logits"]
    assert doubled.dtype == torch.float64
    torch.testing.assert_close(doubled.float(), _outputs(other, batch)["pred_logits"], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(original, doubled.float())


def test_fine_tuning_after_from_pretrained_and_inference(tiny_checkpoint):
    model = detr.from_pretrained(tiny_checkpoint)
    batch = _batch()
    _outputs(model, batch)  # inference first: folds are kept
    model.train()
    assert _kept_folds(model) == 0, "training drops the kept folds"
    trained = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trained]
    optimizer = torch.optim.SGD(trained, lr=0.1)
    outputs = model(batch.pixel_values, batch.pixel_mask)
    loss = outputs["pred_logits"].square().mean() + outputs["pred_boxes"].sum()
    loss.backward()
    conv = model.backbone.body.layer2[0].conv1.weight
    assert conv.grad is not None and conv.grad.abs().sum() > 0, "gradients reach the folded convolutions"
    assert model.backbone.body.conv1.weight.grad is None, "the stem stays frozen"
    optimizer.step()
    assert not torch.equal(conv, before[[id(p) for p in trained].index(id(conv))])
    # Back to inference: the trained weights, not folds kept from before.
    model.eval()
    fresh = detr.DETR(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(_outputs(model, batch)["pred_logits"], _outputs(fresh, batch)["pred_logits"])


def test_save_and_load_round_trip_after_inference(tiny_checkpoint, tmp_path):
    model = detr.from_pretrained(tiny_checkpoint)
    batch = _batch()
    expected = _outputs(model, batch)
    detr.save_pretrained(model, str(tmp_path / "again.pth"))
    loaded = detr.from_pretrained(str(tmp_path / "again.pth"))
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    got = _outputs(loaded, batch)
    assert torch.equal(got["pred_logits"], expected["pred_logits"])
    assert torch.equal(got["pred_boxes"], expected["pred_boxes"])


def test_ddp_trains_the_model_from_pretrained(tiny_checkpoint, tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = detr.from_pretrained(tiny_checkpoint)
        _outputs(model, _batch())
        ddp = DistributedDataParallel(model.train())
        batch = _batch(seed=1)
        outputs = ddp(batch.pixel_values, batch.pixel_mask)
        (outputs["pred_logits"].square().mean() + outputs["pred_boxes"].sum()).backward()
        grad = model.backbone.body.layer3[0].conv2.weight.grad
        assert grad is not None and grad.abs().sum() > 0
    finally:
        dist.destroy_process_group()


def test_optimize_for_inference_is_kept_for_old_callers(tiny_checkpoint):
    model = detr.from_pretrained(tiny_checkpoint).train()
    with pytest.warns(DeprecationWarning, match="model.eval"):
        same = detr.optimize_for_inference(model)
    assert same is model and not model.training
    batch = _batch()
    fresh = detr.from_pretrained(tiny_checkpoint)
    assert torch.equal(_outputs(same, batch)["pred_logits"], _outputs(fresh, batch)["pred_logits"])


def test_models_made_in_inference_mode_still_run(tiny_checkpoint):
    with torch.inference_mode():  # inference tensors have no version counter: nothing can be kept
        model = detr.from_pretrained(tiny_checkpoint)
        outputs = model(_batch().pixel_values, _batch().pixel_mask)
    assert _kept_folds(model) == 0
    assert torch.equal(outputs["pred_logits"], _outputs(detr.from_pretrained(tiny_checkpoint), _batch())["pred_logits"])
