"""Random-weight DETR checkpoints in the two public layouts, written the way the real ones are.

The hub layout comes from ``transformers``' own ``save_pretrained`` (so its key names are the
hub's, not ours); the original layout is mapped from it by hand, as the official conversion
script does in reverse.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

import detr


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Give every parameter and buffer non-trivial values (frozen-BN statistics included), so a
    mismapped weight shows up in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if not tensor.is_floating_point():
                continue
            if tensor.dim() > 1:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / math.sqrt(tensor[0].numel()))
            elif "running_var" in name:
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith("weight"):
                tensor.copy_(1 + 0.1 * torch.randn(tensor.shape, generator=generator))
            else:
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))


def reference_model(seed: int = 0, **config):
    """transformers' DetrForObjectDetection with random weights (eval mode)."""
    from transformers import DetrConfig as HFDetrConfig
    from transformers import DetrForObjectDetection

    model = DetrForObjectDetection(HFDetrConfig(**({"num_labels": 91} | config))).eval()
    randomize_(model, seed)
    with torch.no_grad():
        model.model.query_position_embeddings.weight.normal_(generator=torch.Generator().manual_seed(seed))
    return model


def write_hub_layout(model, folder: Path) -> Path:
    """``model.safetensors`` as ``facebook/detr-resnet-50`` ships it."""
    model.save_pretrained(folder)
    return Path(folder) / "model.safetensors"


_HUB_TO_ORIGINAL = (
    (r"^model\.backbone\.conv_encoder\.model\.", "backbone.0.body."),
    (r"^model\.input_projection\.", "input_proj."),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (r"^model\.(encoder|decoder)\.layers\.", r"transformer.\1.layers."),
    (r"^model\.decoder\.layernorm\.", "transformer.decoder.norm."),
    (r"^class_labels_classifier\.", "class_embed."),
    (r"^bbox_predictor\.", "bbox_embed."),
    (r"\.fc1\.", ".linear1."),
    (r"\.fc2\.", ".linear2."),
    (r"\.encoder_attn\.", ".multihead_attn."),
    (r"(encoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm1."),
    (r"(encoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm2."),
    (r"(decoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm1."),
    (r"(decoder\.layers\.\d+)\.encoder_attn_layer_norm\.", r"\1.norm2."),
    (r"(decoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm3."),
)


def hub_to_original(hub_state: dict) -> dict:
    """Reverse of the official conversion: hub keys -> ``detr-r50-e632da11.pth`` keys."""
    state = {}
    for key, value in hub_state.items():
        for pattern, replacement in _HUB_TO_ORIGINAL:
            key = re.sub(pattern, replacement, key)
        state[key] = value
    for key in [k for k in state if ".q_proj." in k]:
        stem, kind = key.split(".q_proj.")
        parts = [state.pop(f"{stem}.{p}_proj.{kind}") for p in ("q", "k", "v")]
        state[f"{stem}.in_proj_{kind}"] = torch.cat(parts)
    return state


def write_original_layout(hub_file: Path, path: Path) -> Path:
    """``detr-r50-*.pth`` layout: ``{"model": state_dict}`` in the original key names."""
    from safetensors.torch import load_file

    torch.save({"model": hub_to_original(load_file(hub_file))}, path)
    return path


def tiny_config(**overrides) -> detr.DetrConfig:
    """A small DETR (ResNet-18, 1+1 layers) for pipeline tests where R50 speed would dominate."""
    values = dict(
        backbone="resnet18",
        hidden_dim=64,
        num_heads=4,
        num_encoder_layers=1,
        num_decoder_layers=2,
        dim_feedforward=128,
        num_queries=20,
    )
    return detr.DetrConfig(**(values | overrides))


def write_tiny_checkpoint(path: str, seed: int = 0, **overrides) -> str:
    """A random tiny DETR saved with :func:`detr.save_pretrained` (any fsspec URL)."""
    torch.manual_seed(seed)
    model = detr.DETR(tiny_config(**overrides))
    randomize_(model, seed)
    detr.save_pretrained(model, path)
    return path


def write_decisive_checkpoint(path: str, config: detr.DetrConfig, seed: int = 0) -> str:
    """Random weights whose class head is scaled up, so scores spread over (0, 1) as a trained model's do
    (unscaled, every query scores ~0.1 and near-tied classes make "the same detections" meaningless)."""
    torch.manual_seed(seed)
    model = detr.DETR(config)
    randomize_(model, seed)
    with torch.no_grad():
        model.class_embed.weight.mul_(8.0)
        model.class_embed.bias.mul_(8.0)
    detr.save_pretrained(model, path)
    return path
