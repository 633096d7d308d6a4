"""Checkpoint I/O: both public DETR layouts in, one layout out.

* original (``detr-r50-e632da11.pth``): ``{"model": state_dict, ...}`` or a bare state dict with
  keys such as ``backbone.0.body.layer1.0.conv1.weight`` and packed ``in_proj_weight``;
* hub (``facebook/detr-resnet-50`` ``model.safetensors``): ``model.backbone.conv_encoder.model.*``,
  separate ``q_proj/k_proj/v_proj``, ``class_labels_classifier.*``, ``bbox_predictor.*``.

Both are mapped onto :class:`detr.model.DETR`'s names, which follow the original layout.
Nothing is unpickled beyond tensors and plain containers (``weights_only``), and every name
and shape is checked. Checkpoints written by :func:`save_pretrained` are in the original
layout plus ``config`` and ``categories``, so fine-tuned weights carry their class table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import fsspec
import torch
from safetensors.torch import load_file as load_safetensors_file
from torch import Tensor

from .categories import COCO_CATEGORIES, Category, categories_from_list, categories_to_list
from .config import DetrConfig
from .download import local_path
from .errors import one_line
from .model import DETR
from .weights import identified_by_sha256, registered

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# Hub name pieces -> ours, applied in order to every key (after the per-layer renames below).
_HUB_RENAMES = (
    (r"^model\.backbone\.(conv_encoder\.)?model\.", "backbone.body."),
    (r"^model\.input_projection\.", "input_proj."),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (r"^model\.(encoder|decoder)\.layers\.", r"transformer.\1.layers."),
    (r"^model\.decoder\.layernorm\.", "transformer.decoder.norm."),
    (r"^class_labels_classifier\.", "class_embed."),
    (r"^bbox_predictor\.", "bbox_embed."),
    (r"\.o_proj\.", ".out_proj."),
    (r"\.(mlp\.)?fc1\.", ".linear1."),
    (r"\.(mlp\.)?fc2\.", ".linear2."),
    (r"\.encoder_attn\.", ".multihead_attn."),
)
_HUB_NORMS = {
    "encoder": {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2"},
    "decoder": {"self_attn_layer_norm": "norm1", "encoder_attn_layer_norm": "norm2", "final_layer_norm": "norm3"},
}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names the keys or shapes at fault."""


def read_state(source: str) -> tuple[dict[str, Tensor], dict]:
    """Load a checkpoint file into ``(state_dict, extras)`` without executing pickled code.

    ``extras`` holds ``config`` / ``categories`` when the file carries them, and ``sha256``: the
    file's digest, by which official files are recognised whatever their name.
    """
    path = local_path(source)
    state, extras = _read_file(path, source)
    return state, extras | {"sha256": _file_sha256(path)}


def _read_file(path: Path, source: str) -> tuple[dict[str, Tensor], dict]:
    """``read_state`` without the digest. The tensors are memory-mapped (safetensors, and
    ``torch.save`` zip files): their bytes are read from the file when something uses them."""
    with open(path, "rb") as file:
        head = file.read(9)
    if path.suffix == ".safetensors" or head[:1] == b"{" or _looks_like_safetensors(head):
        return dict(load_safetensors_file(path)), {}
    try:
        # mmap needs the zip format torch.save has written since 1.6; older files are read whole.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # noqa: BLE001 - report which file and why in one line
        raise CheckpointError(f"{source}: not a loadable DETR checkpoint ({one_line(error)})") from None
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        extras = {k: obj[k] for k in ("config", "categories") if k in obj}
        return dict(obj["model"]), extras
    if isinstance(obj, Mapping) and all(isinstance(v, Tensor) for v in obj.values()):
        return dict(obj), {}
    raise CheckpointError(f"{source}: expected a state dict or a dict with a 'model' state dict")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _looks_like_safetensors(data: bytes) -> bool:
    # 8-byte little-endian header length followed by a JSON header.
    return len(data) >= 9 and data[8:9] == b"{"


def to_detr_layout(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map either public layout onto :class:`DETR`'s parameter names."""
    state = {_strip_wrappers(k): v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    if any(k.startswith(("model.backbone.", "class_labels_classifier.")) for k in state):
        return _from_hub(state)
    return {re.sub(r"^backbone\.0\.body\.", "backbone.body.", k): v for k, v in state.items()}


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _from_hub(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    renamed: dict[str, Tensor] = {}
    for key, value in state.items():
        match = re.match(r"^model\.(encoder|decoder)\.layers\.\d+\.([a-z_]+_layer_norm)\.", key)
        if match and match.group(2) in _HUB_NORMS[match.group(1)]:
            key = key.replace(f".{match.group(2)}.", f".{_HUB_NORMS[match.group(1)][match.group(2)]}.")
        for pattern, replacement in _HUB_RENAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return _pack_in_proj(renamed)


def _pack_in_proj(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Concatenate separate q/k/v projections into DETR's packed ``in_proj`` ([3C, C] / [3C])."""
    packed = dict(state)
    for key in [k for k in state if re.search(r"\.q_proj\.(weight|bias)$", k)]:
        stem, kind = key.rsplit(".q_proj.", 1)
        parts = [f"{stem}.{p}_proj.{kind}" for p in ("q", "k", "v")]
        if all(p in state for p in parts):
            packed[f"{stem}.in_proj_{kind}"] = torch.cat([state[p] for p in parts])
            for p in parts:
                del packed[p]
    return packed


def infer_config(state: Mapping[str, Tensor], *, dilation: bool = False) -> DetrConfig:
    """Read the architecture off a state dict in :class:`DETR`'s layout."""
    try:
        layer3_blocks = {int(m.group(1)) for k in state if (m := re.match(r"backbone\.body\.layer3\.(\d+)\.", k))}
        enc = {int(m.group(1)) for k in state if (m := re.match(r"transformer\.encoder\.layers\.(\d+)\.", k))}
        dec = {int(m.group(1)) for k in state if (m := re.match(r"transformer\.decoder\.layers\.(\d+)\.", k))}
        bottleneck = "backbone.body.layer1.0.conv3.weight" in state
        backbone = {(6, True): "resnet50", (23, True): "resnet101", (6, False): "resnet34", (2, False): "resnet18"}[
            (len(layer3_blocks), bottleneck)
        ]
        hidden = state["query_embed.weight"].shape[1]
        return DetrConfig(
            backbone=backbone,
            dilation=dilation,
            hidden_dim=hidden,
            num_heads=DetrConfig.num_heads,
            num_encoder_layers=len(enc),
            num_decoder_layers=len(dec),
            dim_feedforward=state["transformer.decoder.layers.0.linear1.weight"].shape[0],
            num_queries=state["query_embed.weight"].shape[0],
            num_classes=state["class_embed.weight"].shape[0] - 1,
        )
    except (KeyError, IndexError, ValueError) as error:
        raise CheckpointError(f"not a DETR checkpoint: cannot read its architecture ({error})") from None


def load_detr_state(model: DETR, state: Mapping[str, Tensor], *, skip_prefixes: Sequence[str] = ()) -> None:
    """Copy ``state`` into ``model`` after checking every name and shape.

    Args:
        skip_prefixes: parameters the caller re-initializes on purpose (a new class head).
    """
    _check_names_and_shapes({k: v.shape for k, v in model.state_dict().items()}, state, skip_prefixes)
    skip = tuple(skip_prefixes)
    model.load_state_dict({k: v for k, v in state.items() if not (skip and k.startswith(skip))}, strict=not skip)


def _check_names_and_shapes(
    expected: Mapping[str, torch.Size], state: Mapping[str, Tensor], skip_prefixes: Sequence[str] = ()
) -> None:
    """Raise :class:`CheckpointError` naming the keys ``state`` lacks or has in excess, or the wrong shapes."""
    skip = tuple(skip_prefixes)
    expected = {k: v for k, v in expected.items() if not (skip and k.startswith(skip))}
    given = {k: v for k, v in state.items() if not (skip and k.startswith(skip))}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match the model: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    wrong = [
        f"{k}: {tuple(given[k].shape)} vs expected {tuple(shape)}"
        for k, shape in expected.items()
        if given[k].shape != shape
    ]
    if wrong:
        raise CheckpointError(f"checkpoint shapes do not match the model: {wrong[:5]}")


def from_pretrained(
    source: str,
    *,
    num_classes: int | None = None,
    categories: Sequence[Category] | None = None,
    dilation: bool | None = None,
) -> DETR:
    """A DETR in eval mode with the weights ``source`` names, ready for fast inference as it is.

    The architecture comes from, in order: the :mod:`detr.weights` registry (a short name such as
    ``detr-r50-dc5``, an ``hf://`` repo, or an official file recognised by its SHA-256), the config
    a :func:`save_pretrained` checkpoint carries, or the tensors themselves (then without dilation
    unless ``dilation=True``: DC5 cannot be read off the weights).

    The model is the same one :func:`detr.build` makes - ``.train()`` it to fine-tune - and runs
    channels-last with its frozen norms folded into the convolutions (:mod:`detr.backbone`),
    without a call to :func:`detr.optimize_for_inference`.

    Args:
        source: a short name (``detr-r50``, ``detr-r50-dc5``, ``detr-r101``), ``hf://facebook/detr-resnet-50``,
            a local path or any fsspec URL to a checkpoint in either public layout or one written by
            :func:`save_pretrained`.
        num_classes: when it differs from the checkpoint's, everything but the class head is loaded
            and the class head is freshly initialized (the fine-tuning path).
        categories: class table for a new head (defaults to generic names).
        dilation: DC5 variant, for checkpoints the registry does not know and that carry no config.
    """
    weights = _read_weights(source, num_classes=num_classes, dilation=dilation)
    new_head = weights.config.num_classes != weights.stored_config.num_classes
    model_categories = categories if new_head else (weights.categories or categories)
    if new_head:  # the new class head needs DETR's own initialization
        model = DETR(weights.config, model_categories)
    else:  # every tensor comes from the file: skip initializing 41M parameters only to overwrite them
        with torch.device("meta"):
            model = DETR(weights.config, model_categories)
        model = model.to_empty(device="cpu")
    load_detr_state(model, weights.state, skip_prefixes=("class_embed.",) if new_head else ())
    model.weights_name = weights.name
    return model.eval()


def check_weights(source: str, *, dilation: bool | None = None) -> tuple[DetrConfig, str]:
    """What :func:`from_pretrained` would load from ``source``, checked without building the model.

    Fetches the file into the download cache if needed, reads its names and shapes (tensor bytes
    stay on disk: the file is memory-mapped) and checks them against the architecture it implies,
    raising the same :class:`CheckpointError` / :class:`~detr.WeightsUnavailableError` as
    :func:`from_pretrained`. Returns the config and the ``weights_name`` the model would carry.
    """
    weights = _read_weights(source, dilation=dilation)
    with torch.device("meta"):  # shapes only: no memory, no initialization
        expected = {k: v.shape for k, v in DETR(weights.config, weights.categories).state_dict().items()}
    _check_names_and_shapes(expected, weights.state)
    return weights.config, weights.name


@dataclasses.dataclass(frozen=True)
class _Weights:
    state: dict[str, Tensor]  # in DETR's layout, memory-mapped from the file
    stored_config: DetrConfig  # the architecture the file holds
    config: DetrConfig  # the one to build: with the caller's dilation and class count
    categories: tuple[Category, ...] | None  # the file's class table, when it names one
    name: str  # ``<file name>@<content hash>``: which weights made a row


def _read_weights(source: str, *, num_classes: int | None = None, dilation: bool | None = None) -> _Weights:
    path = local_path(source)
    state, extras = _read_file(path, source)
    state = to_detr_layout(state)
    # A file that carries its config was written by save_pretrained, never an official download:
    # only other unregistered files are hashed whole to be recognised.
    entry = registered(source) or (None if "config" in extras else identified_by_sha256(_file_sha256(path)))
    if entry is not None:
        config, stored_categories = entry.config, entry.categories
    elif "config" in extras:
        config = DetrConfig.from_dict(extras["config"])
        stored_categories = categories_from_list(extras["categories"]) if "categories" in extras else None
    else:
        config, stored_categories = infer_config(state), None
    overrides = {"dilation": dilation} if dilation is not None else {}
    if num_classes is not None and num_classes != config.num_classes:
        overrides["num_classes"] = num_classes
    name = f"{Path(source.rstrip('/')).name}@{_content_hash(state)}"
    return _Weights(state, config, dataclasses.replace(config, **overrides), stored_categories, name)


def save_pretrained(model: DETR, destination: str) -> None:
    """Write ``model`` to ``destination`` (any fsspec URL) in the original layout, with its
    config and category table, loadable by :func:`from_pretrained`."""
    payload = {
        "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "config": unwrap(model).config.to_dict(),
        "categories": categories_to_list(unwrap(model).categories),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with fsspec.open(destination, "wb") as f:
        f.write(buffer.getvalue())


def unwrap(model: torch.nn.Module) -> DETR:
    """The DETR inside DistributedDataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


def _content_hash(state: Mapping[str, Tensor]) -> str:
    """A short hash of the weights (names and a sample of values): identifies which weights made a row."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().flatten()
        digest.update(key.encode())
        digest.update(tensor[:: max(1, tensor.numel() // 64)].float().numpy().tobytes())
    return digest.hexdigest()[:8]


__all__ = [
    "check_weights",
    "from_pretrained",
    "save_pretrained",
    "read_state",
    "to_detr_layout",
    "CheckpointError",
    "COCO_CATEGORIES",
]
