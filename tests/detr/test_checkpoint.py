"""Checkpoint I/O: both public layouts, wrapper prefixes, strict name/shape checks, no pickled code."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import detr
from detr.checkpoint import CheckpointError, read_state, to_detr_layout
from detr.download import cache_dir, resolve_url
from detr.weights import REGISTRY, PretrainedWeights

from checkpoints import hub_to_original, randomize_, tiny_config, write_tiny_checkpoint


def test_both_public_layouts_give_the_same_weights(reference_r50):
    _, hub_file, original_file = reference_r50
    from_hub = detr.from_pretrained(str(hub_file)).state_dict()
    from_original = detr.from_pretrained(str(original_file)).state_dict()
    assert from_hub.keys() == from_original.keys()
    for key in from_hub:
        assert torch.equal(from_hub[key], from_original[key]), key


def test_architecture_is_read_off_the_weights(reference_r50):
    model = detr.from_pretrained(str(reference_r50[2]))
    assert model.config == detr.DetrConfig()
    assert not model.training
    assert model.categories == detr.COCO_CATEGORIES


def test_wrapper_prefixes_are_stripped(tmp_path, reference_r50):
    state = load_file(reference_r50[1])
    wrapped = {f"module._orig_mod.{k}": v for k, v in hub_to_original(state).items()}
    torch.save({"model": wrapped}, tmp_path / "ddp.pth")
    reference = detr.from_pretrained(str(reference_r50[2])).state_dict()
    loaded = detr.from_pretrained(str(tmp_path / "ddp.pth")).state_dict()
    assert all(torch.equal(reference[k], loaded[k]) for k in reference)


def test_missing_and_unexpected_keys_are_named(tmp_path, tiny_checkpoint):
    state, extras = read_state(tiny_checkpoint)
    del state["class_embed.bias"]
    state["transformer.encoder.layers.0.extra.weight"] = torch.zeros(1)
    torch.save({"model": state, **extras}, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \['class_embed.bias'\].*extra.weight"):
        detr.from_pretrained(str(tmp_path / "broken.pth"))


def test_wrong_shapes_are_named(tmp_path, tiny_checkpoint):
    state, extras = read_state(tiny_checkpoint)
    state["query_embed.weight"] = torch.zeros(7, 64)
    torch.save({"model": state, **extras}, tmp_path / "shapes.pth")
    with pytest.raises(CheckpointError, match=r"query_embed.weight: \(7, 64\) vs expected \(20, 64\)"):
        detr.from_pretrained(str(tmp_path / "shapes.pth"))


def test_a_checkpoint_of_another_architecture_is_rejected(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(CheckpointError, match="not a DETR checkpoint"):
        detr.from_pretrained(str(tmp_path / "resnet18.pth"))


class _Payload:
    def __reduce__(self):
        return (open, ("/tmp/detr-ray-pickle-ran", "w"))


def test_pickled_code_is_never_executed(tmp_path):
    marker = "/tmp/detr-ray-pickle-ran"
    torch.save({"model": {"x": torch.zeros(1)}, "evil": _Payload()}, tmp_path / "evil.pth", pickle_module=pickle)
    with pytest.raises(CheckpointError, match="evil.pth: not a loadable DETR checkpoint"):
        detr.from_pretrained(str(tmp_path / "evil.pth"))
    import os

    assert not os.path.exists(marker)


def test_new_class_count_keeps_everything_but_the_class_head(tiny_checkpoint):
    base = detr.from_pretrained(tiny_checkpoint)
    categories = [detr.Category(10, "square"), detr.Category(20, "circle")]
    model = detr.from_pretrained(tiny_checkpoint, num_classes=2, categories=categories)
    assert model.config.num_classes == 2 and model.categories == tuple(categories)
    assert model.class_embed.weight.shape == (3, base.config.hidden_dim)
    base_state, new_state = base.state_dict(), model.state_dict()
    for key, value in new_state.items():
        if not key.startswith("class_embed."):
            assert torch.equal(value, base_state[key]), key


def test_save_and_load_round_trip_through_object_storage(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("DETR_RAY_CACHE", str(tmp_path / "cache"))
    model = detr.DETR(tiny_config(num_classes=3), [detr.Category(i, n) for i, n in [(5, "a"), (7, "b"), (9, "c")]])
    randomize_(model, seed=3)
    url = f"s3://{s3_bucket}/runs/1/final.pth"
    detr.save_pretrained(model, url)
    loaded = detr.from_pretrained(url)
    assert loaded.config == model.config and loaded.categories == model.categories
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert len(list((tmp_path / "cache").rglob("final.pth"))) == 1, "remote weights are cached on disk"


def test_safetensors_layout_detected_by_content(tmp_path, reference_r50):
    save_file(load_file(reference_r50[1]), tmp_path / "weights.bin")
    state, _ = read_state(str(tmp_path / "weights.bin"))
    assert "class_embed.weight" in to_detr_layout(state)


def test_dilation_comes_from_the_registry_not_the_file_name(tmp_path, monkeypatch, reference_r50):
    # A registry name: its entry says DC5 (the file is put where the download would have cached it).
    monkeypatch.setenv("DETR_RAY_CACHE", str(tmp_path / "cache"))
    for name in ("detr-r50-dc5", "detr-r50"):
        local_path_of(name).parent.mkdir(parents=True)
        local_path_of(name).symlink_to(reference_r50[2])
    assert detr.from_pretrained("detr-r50-dc5").config.dilation
    assert not detr.from_pretrained("detr-r50").config.dilation
    # Any other file: "dc5" in its name means nothing; the caller says so, or a saved config does.
    (tmp_path / "detr-r50-dc5-test.pth").symlink_to(reference_r50[2])
    assert not detr.from_pretrained(str(tmp_path / "detr-r50-dc5-test.pth")).config.dilation
    assert detr.from_pretrained(str(tmp_path / "detr-r50-dc5-test.pth"), dilation=True).config.dilation
    detr.save_pretrained(detr.from_pretrained(str(reference_r50[2]), dilation=True), str(tmp_path / "mine.pth"))
    assert detr.from_pretrained(str(tmp_path / "mine.pth")).config.dilation


def test_an_official_file_is_known_by_its_checksum_whatever_its_name(tmp_path, monkeypatch, reference_r50):
    data = reference_r50[2].read_bytes()
    entry = PretrainedWeights(
        "test-dc5",
        "https://example.invalid/test-dc5.pth",
        hashlib.sha256(data).hexdigest()[:8],
        detr.DetrConfig(dilation=True),
    )
    monkeypatch.setitem(REGISTRY, entry.name, entry)
    (tmp_path / "renamed.pth").write_bytes(data)
    assert detr.from_pretrained(str(tmp_path / "renamed.pth")).config.dilation


def test_content_hash_names_the_weights(tmp_path):
    a = write_tiny_checkpoint(str(tmp_path / "a.pth"), seed=1)
    b = write_tiny_checkpoint(str(tmp_path / "b.pth"), seed=2)
    name_a, name_b = detr.from_pretrained(a).weights_name, detr.from_pretrained(b).weights_name
    assert name_a.startswith("a.pth@") and name_a.split("@")[1] != name_b.split("@")[1]


def local_path_of(name: str) -> Path:
    """Where a registry name's download is cached (the cache layout of detr.download)."""
    url = resolve_url(name)
    return cache_dir() / hashlib.sha256(url.encode()).hexdigest()[:16] / Path(url).name


def transformers_outputs(folder: Path, pixel_values: torch.Tensor, pixel_mask: torch.Tensor):
    """``(logits, boxes)`` of transformers' own DetrForObjectDetection loaded from a hub folder."""
    from transformers import DetrForObjectDetection

    model, info = DetrForObjectDetection.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        outputs = model.eval()(pixel_values=pixel_values, pixel_mask=pixel_mask.long())
    return model, outputs.logits, outputs.pred_boxes


def random_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two normalized images [2, 3, 96, 128], the second padded on its right quarter."""
    pixel_values = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(seed))
    pixel_mask = torch.ones(2, 96, 128, dtype=torch.bool)
    pixel_mask[1, :, 96:] = False
    return pixel_values, pixel_mask


@pytest.mark.parametrize("variant", ["tiny-resnet18", "r50", "r50-dc5"])
def test_hub_layout_export_loads_in_transformers_with_equal_outputs(tmp_path, reference_r50, variant):
    categories = [detr.Category(i, n) for i, n in [(10, "square"), (20, "circle"), (30, "triangle")]]
    if variant == "tiny-resnet18":
        torch.manual_seed(0)
        model = detr.DETR(tiny_config(num_classes=3), categories)
        randomize_(model, seed=4)
    else:
        model = detr.from_pretrained(str(reference_r50[2]), dilation=variant == "r50-dc5")
    model.eval()
    pixel_values, pixel_mask = random_batch()

    detr.save_pretrained(model, str(tmp_path / "hub"), layout="hub")

    assert sorted(p.name for p in (tmp_path / "hub").iterdir()) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    hf_model, logits, boxes = transformers_outputs(tmp_path / "hub", pixel_values, pixel_mask)
    with torch.no_grad():
        ours = model(pixel_values, pixel_mask)
    torch.testing.assert_close(ours["pred_logits"], logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours["pred_boxes"], boxes, atol=1e-4, rtol=0)
    assert hf_model.config.id2label == {i: c.name for i, c in enumerate(model.categories)}
    assert hf_model.config.dilation == model.config.dilation and hf_model.config.num_queries == model.config.num_queries


def test_hub_export_round_trips_with_category_ids_through_object_storage(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("DETR_RAY_CACHE", str(tmp_path / "cache"))
    categories = [detr.Category(i, n) for i, n in [(5, "a"), (7, "b"), (9, "c")]]
    model = detr.DETR(tiny_config(num_classes=3, num_heads=2), categories)  # 2 heads: not readable off the tensors
    randomize_(model, seed=5)
    folder = f"s3://{s3_bucket}/runs/1/hub"

    detr.save_pretrained(model, folder, layout="hub")

    loaded = detr.from_pretrained(f"{folder}/model.safetensors")
    assert loaded.config == model.config and loaded.categories == tuple(categories)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_hub_layout_names_are_the_inverse_of_reading_them(reference_r50):
    from safetensors.torch import load_file

    from detr.checkpoint import to_hub_layout

    hub = load_file(reference_r50[1])  # written by transformers' own save_pretrained
    ours = detr.from_pretrained(str(reference_r50[1])).state_dict()
    exported = to_hub_layout(ours)
    assert exported.keys() == {k for k in hub if not k.endswith("num_batches_tracked")}
    assert all(torch.equal(exported[k], hub[k]) for k in exported)


def test_unknown_layout_and_inexpressible_models_are_refused(tmp_path):
    model = detr.DETR(tiny_config(position_temperature=20.0))
    with pytest.raises(ValueError, match=r"layout must be one of \('original', 'hub'\), got 'onnx'"):
        detr.save_pretrained(model, str(tmp_path / "x"), layout="onnx")
    with pytest.raises(ValueError, match="fixed position temperature of 10000; this model uses 20"):
        detr.save_pretrained(model, str(tmp_path / "x"), layout="hub")


def test_hub_folder_image_processor_prepares_images_as_we_do(tmp_path):
    from transformers import DetrImageProcessor

    detr.save_pretrained(detr.DETR(tiny_config()), str(tmp_path), layout="hub", image_size=(128, 213))
    processor = DetrImageProcessor.from_pretrained(tmp_path)
    image = torch.randint(0, 256, (100, 300, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy()

    theirs = processor(images=image, return_tensors="pt")["pixel_values"]
    ours = detr.preprocess([image], min_size=128, max_size=213).pixel_values

    assert theirs.shape == ours.shape == (1, 3, 71, 213)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
