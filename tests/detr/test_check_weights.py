"""detr.checkpoint.check_weights: what from_pretrained would load, checked without building the model."""

from __future__ import annotations

import hashlib

import pytest
import torch

import detr
from detr.checkpoint import CheckpointError, check_weights, read_state
from detr.weights import REGISTRY, PretrainedWeights

from checkpoints import tiny_config


@pytest.mark.parametrize("layout", ["hub", "original"])
def test_config_and_name_are_those_from_pretrained_gives(reference_r50, layout):
    _, hub_file, original_file = reference_r50
    source = str(hub_file if layout == "hub" else original_file)
    config, name = check_weights(source)
    model = detr.from_pretrained(source)
    assert (config, name) == (model.config, model.weights_name)


def test_saved_config_and_dilation_are_read_as_from_pretrained_reads_them(tiny_checkpoint, reference_r50):
    assert check_weights(tiny_checkpoint) == (tiny_config(), detr.from_pretrained(tiny_checkpoint).weights_name)
    assert check_weights(str(reference_r50[2]), dilation=True)[0].dilation


def test_an_official_file_is_recognised_by_its_checksum(tmp_path, monkeypatch, reference_r50):
    data = reference_r50[2].read_bytes()
    checksum = hashlib.sha256(data).hexdigest()[:8]
    entry = PretrainedWeights("test-dc5", "https://example.invalid/t.pth", checksum, detr.DetrConfig(dilation=True))
    monkeypatch.setitem(REGISTRY, entry.name, entry)
    (tmp_path / "renamed.pth").write_bytes(data)
    assert check_weights(str(tmp_path / "renamed.pth"))[0].dilation


def test_the_same_errors_as_from_pretrained(tmp_path, tiny_checkpoint):
    state, extras = read_state(tiny_checkpoint)
    extras.pop("sha256")
    missing = dict(state)
    del missing["class_embed.bias"]
    torch.save({"model": missing, **extras}, tmp_path / "missing.pth")
    shapes = dict(state, **{"query_embed.weight": torch.zeros(7, 64)})
    torch.save({"model": shapes, **extras}, tmp_path / "shapes.pth")
    for name, message in (("missing", r"missing keys \['class_embed.bias'\]"), ("shapes", r"\(7, 64\) vs expected")):
        for load in (check_weights, detr.from_pretrained):
            with pytest.raises(CheckpointError, match=message):
                load(str(tmp_path / f"{name}.pth"))
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="text.pth: not a loadable DETR checkpoint"):
        check_weights(str(tmp_path / "text.pth"))
    with pytest.raises(detr.WeightsUnavailableError, match="weights file not found"):
        check_weights(str(tmp_path / "absent.pth"))


def test_a_legacy_non_zip_torch_file_is_read_whole(tmp_path, tiny_checkpoint):
    state, extras = read_state(tiny_checkpoint)
    extras.pop("sha256")
    torch.save({"model": state, **extras}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert check_weights(str(tmp_path / "legacy.pth"))[0] == tiny_config()
    model = detr.from_pretrained(str(tmp_path / "legacy.pth"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
