"""detr.DETR against transformers' DetrForObjectDetection on the same random weights."""

from __future__ import annotations

import pytest
import torch

import detr

from checkpoints import tiny_config

pytest.importorskip("transformers")


def _batch_of_mixed_sizes(seed: int = 0) -> detr.ImageBatch:
    generator = torch.Generator().manual_seed(seed)
    sizes = [(240, 320), (300, 200), (256, 256)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in sizes]
    return detr.preprocess(images, min_size=224, max_size=320)


@pytest.mark.parametrize("layout", ["hub", "original"])
def test_outputs_equal_transformers_on_same_weights(reference_r50, layout):
    reference, hub_file, original_file = reference_r50
    model = detr.from_pretrained(str(hub_file if layout == "hub" else original_file))
    batch = _batch_of_mixed_sizes()
    assert not batch.pixel_mask.all(), "the batch must contain padding"
    with torch.inference_mode():
        expected = reference(pixel_values=batch.pixel_values, pixel_mask=batch.pixel_mask.long())
        ours = model(batch.pixel_values, batch.pixel_mask)
    assert ours["pred_logits"].shape == (3, 100, 92)
    assert expected.logits.std() > 0.1, "random weights must give non-trivial logits"
    torch.testing.assert_close(ours["pred_logits"], expected.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours["pred_boxes"], expected.pred_boxes, atol=1e-5, rtol=0)


def test_training_mode_adds_auxiliary_outputs():
    model = detr.DETR(tiny_config(num_decoder_layers=3)).train()
    batch = _batch_of_mixed_sizes()
    outputs = model(batch.pixel_values, batch.pixel_mask)
    assert len(outputs["aux_outputs"]) == 2
    for aux in outputs["aux_outputs"]:
        assert aux["pred_logits"].shape == outputs["pred_logits"].shape
        assert aux["pred_boxes"].shape == outputs["pred_boxes"].shape
    assert "aux_outputs" not in model.eval()(batch.pixel_values, batch.pixel_mask)


def test_boxes_are_normalized_and_gradients_reach_the_backbone():
    model = detr.DETR(tiny_config()).train()
    batch = _batch_of_mixed_sizes()
    outputs = model(batch.pixel_values, batch.pixel_mask)
    assert ((outputs["pred_boxes"] >= 0) & (outputs["pred_boxes"] <= 1)).all()
    outputs["pred_logits"].sum().backward()
    assert model.backbone.body.layer4[0].conv1.weight.grad is not None
    assert model.backbone.body.conv1.weight.grad is None, "the stem stays frozen, as in DETR"


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_backbone_folds_frozen_norms_exactly_forward_and_backward(backbone):
    """Our stem and blocks apply each frozen batch norm by scaling the convolution weights; outputs
    and the trained weights' gradients must equal torchvision's plain conv -> norm blocks."""
    import torchvision
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.ops.misc import FrozenBatchNorm2d

    from detr.backbone import Backbone

    generator = torch.Generator().manual_seed(0)
    ours = Backbone(detr.DetrConfig(backbone=backbone))
    state = ours.state_dict()
    for key, value in state.items():  # non-trivial statistics, so a wrong fold would show
        if "running_var" in key:
            value.copy_(torch.rand(value.shape, generator=generator) + 0.5)
        elif "running_mean" in key or key.endswith(".bias"):
            value.copy_(torch.randn(value.shape, generator=generator) * 0.1)
    ours.load_state_dict(state)
    ours.double()  # float64, so any difference left is the fold's, not rounding's
    plain = getattr(torchvision.models, backbone)(weights=None, norm_layer=FrozenBatchNorm2d)
    plain.load_state_dict({k.removeprefix("body."): v for k, v in state.items()}, strict=False)
    plain = IntermediateLayerGetter(plain, return_layers={"layer4": "0"}).double()
    pixels = torch.randn(2, 3, 96, 128, generator=generator, dtype=torch.float64)
    features = ours.body(pixels)["0"]
    expected = plain(pixels)["0"]
    torch.testing.assert_close(features, expected, atol=1e-9, rtol=1e-9)
    with torch.no_grad():  # without gradients the folded weights are kept and reused
        torch.testing.assert_close(ours.body(pixels)["0"], expected, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(ours.body(pixels)["0"], expected, atol=1e-9, rtol=1e-9)
    features.square().sum().backward()
    expected.square().sum().backward()
    trained = dict(plain.named_parameters())
    for name, parameter in ours.body.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter.grad, trained[name].grad, atol=1e-6, rtol=1e-9, msg=name)


@pytest.mark.parametrize(
    "pixel_values, pixel_mask, message",
    [
        (torch.zeros(1, 3, 64, 64), torch.ones(1, 64, 64), "bool"),
        (torch.zeros(1, 3, 64, 64), torch.ones(1, 64, 63, dtype=torch.bool), "does not match"),
        (torch.zeros(3, 64, 64), torch.ones(1, 64, 64, dtype=torch.bool), r"\[B, 3, H, W\]"),
        (torch.zeros(1, 4, 64, 64), torch.ones(1, 64, 64, dtype=torch.bool), r"\[B, 3, H, W\]"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), torch.ones(1, 64, 64, dtype=torch.bool), "floating point"),
    ],
)
def test_bad_inputs_say_what_was_expected(pixel_values, pixel_mask, message):
    model = detr.DETR(tiny_config()).eval()
    with pytest.raises(ValueError, match=message):
        model(pixel_values, pixel_mask)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="resnet152"):
        detr.DetrConfig(backbone="resnet152")
    with pytest.raises(ValueError, match="divisible"):
        detr.DetrConfig(hidden_dim=250)
    with pytest.raises(ValueError, match="unknown DetrConfig fields"):
        detr.DetrConfig.from_dict({"hidden": 3})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_on_gpu_stays_close_to_fp32(reference_r50):
    model = detr.from_pretrained(str(reference_r50[1])).cuda()
    batch = _batch_of_mixed_sizes()
    x, mask = batch.pixel_values.cuda(), batch.pixel_mask.cuda()
    with torch.inference_mode():
        fp32 = model(x, mask)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(x, mask)
    assert (fp32["pred_boxes"] - bf16["pred_boxes"].float()).abs().max() < 0.05
    agree = (fp32["pred_logits"].argmax(-1) == bf16["pred_logits"].float().argmax(-1)).float().mean()
    assert agree > 0.9
