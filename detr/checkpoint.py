"""Checkpoint I/O: both public DETR layouts in, one layout out.

* original (``detr-r50-e632da11.pth``): ``{"model": state_dict, ...}`` or a bare state dict with
  keys such as ``backbone.0.body.layer1.0.conv1.weight`` and packed ``in_proj_weight``;
* hub (``facebook/detr-resnet-50`` ``model.safetensors``): ``model.backbone.conv_encoder.model.*``,
  separate ``q_proj/k_proj/v_proj``, ``class_labels_classifier.*``, ``bbox_predictor.*``.

Both are mapped onto :class:`detr.model.DETR`'s names, which follow the original layout.
Nothing is unpickled beyond tensors and plain containers (``weights_only``), and every name
and shape is checked. :func:`save_pretrained` writes either our file (the original layout plus
``config`` and ``categories``, so fine-tuned weights carry their class table) or a hub folder
(``config.json`` + ``model.safetensors``) that ``transformers.DetrForObjectDetection.from_pretrained``
loads; its safetensors metadata carries the same config and class table for :func:`from_pretrained`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import struct
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import fsspec
import torch
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save as save_safetensors
from torch import Tensor

from .categories import COCO_CATEGORIES, Category, categories_from_list, categories_to_list
from .config import MAX_SIZE, MIN_SIZE, DetrConfig
from .download import local_path
from .errors import one_line, redact, scrub
from .model import DETR
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD
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


LAYOUTS = ("original", "hub")
HUB_WEIGHTS_FILE = "model.safetensors"
# Keys of the hub file's safetensors metadata that carry our config and class table (transformers ignores them).
_METADATA_CONFIG, _METADATA_CATEGORIES = "detr_ray_config", "detr_ray_categories"


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
    try:
        if path.suffix == ".safetensors" or head[:1] == b"{" or _looks_like_safetensors(head):
            return dict(load_safetensors_file(path)), _safetensors_extras(path)
        # mmap needs the zip format torch.save has written since 1.6; older files are read whole.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # noqa: BLE001 - report which file and why in one line
        message = f"{source}: not a loadable DETR checkpoint ({one_line(error)})"
        raise CheckpointError(scrub(message, source)) from None
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        extras = {k: obj[k] for k in ("config", "categories") if k in obj}
        return dict(obj["model"]), extras
    if isinstance(obj, Mapping) and all(isinstance(v, Tensor) for v in obj.values()):
        return dict(obj), {}
    raise CheckpointError(f"{redact(source)}: expected a state dict or a dict with a 'model' state dict")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _looks_like_safetensors(data: bytes) -> bool:
    # 8-byte little-endian header length followed by a JSON header.
    return len(data) >= 9 and data[8:9] == b"{"


def _safetensors_extras(path: Path) -> dict:
    """``config`` / ``categories`` from the metadata :func:`save_pretrained` writes into a hub file."""
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        metadata = json.loads(file.read(length)).get("__metadata__") or {}
    extras = {}
    if _METADATA_CONFIG in metadata:
        extras["config"] = json.loads(metadata[_METADATA_CONFIG])
    if _METADATA_CATEGORIES in metadata:
        extras["categories"] = json.loads(metadata[_METADATA_CATEGORIES])
    return extras


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
    name = f"{Path(redact(source).rstrip('/')).name}@{_content_hash(state)}"
    return _Weights(state, config, dataclasses.replace(config, **overrides), stored_categories, name)


def save_pretrained(
    model: DETR,
    destination: str,
    *,
    layout: str = "original",
    image_size: tuple[int, int] = (MIN_SIZE, MAX_SIZE),
) -> None:
    """Write ``model`` to ``destination`` (any fsspec URL), loadable by :func:`from_pretrained`.

    Args:
        layout: ``original``: one file, the original key names plus the config and category table.
            ``hub``: ``destination`` is a folder that ``transformers.DetrForObjectDetection.from_pretrained``
            loads: ``config.json`` (``id2label``: class index -> category name), ``model.safetensors``
            in the hub's key names, ``preprocessor_config.json`` for ``DetrImageProcessor``.
            ``detr.from_pretrained("<folder>/model.safetensors")`` reads it back with the category ids.
        image_size: ``(shortest side, longest side limit)`` the hub folder's image processor resizes
            to (the scale the model was trained at).
    Raises:
        ValueError: an unknown ``layout``, or a model transformers' DETR cannot express.
    """
    model = unwrap(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if layout == "hub":
        _save_hub_folder(model, state, destination.rstrip("/"), image_size)
        return
    if layout != "original":
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    payload = {
        "model": state,
        "config": model.config.to_dict(),
        "categories": categories_to_list(model.categories),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    _write(destination, buffer.getvalue())


def _write(destination: str, data: bytes) -> None:
    with fsspec.open(destination, "wb") as f:  # creates the parent folder of a local path
        f.write(data)


def to_hub_layout(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """:class:`DETR`'s names -> the hub's (``facebook/detr-resnet-50``; the inverse of :func:`to_detr_layout`):
    packed ``in_proj`` [3C, C] split into ``q_proj/k_proj/v_proj`` [C, C], norms and heads renamed."""
    hub: dict[str, Tensor] = {}
    for key, value in state.items():
        match = re.match(r"^transformer\.(encoder|decoder)\.layers\.\d+\.(norm\d)\.", key)
        if match:
            inverse = {ours: theirs for theirs, ours in _HUB_NORMS[match.group(1)].items()}
            key = key.replace(f".{match.group(2)}.", f".{inverse[match.group(2)]}.")
        for pattern, replacement in _TO_HUB:
            key = re.sub(pattern, replacement, key)
        packed = re.match(r"^(.*)\.in_proj_(weight|bias)$", key)
        if packed:
            for name, part in zip(("q", "k", "v"), value.chunk(3)):
                hub[f"{packed.group(1)}.{name}_proj.{packed.group(2)}"] = part.contiguous()
        else:
            hub[key] = value
    return hub


# Ours -> hub name pieces, applied in order (layer norms are renamed first, by _HUB_NORMS).
_TO_HUB = (
    (r"^backbone\.body\.", "model.backbone.conv_encoder.model."),
    (r"^input_proj\.", "model.input_projection."),
    (r"^query_embed\.", "model.query_position_embeddings."),
    (r"^transformer\.(encoder|decoder)\.layers\.", r"model.\1.layers."),
    (r"^transformer\.decoder\.norm\.", "model.decoder.layernorm."),
    (r"^class_embed\.", "class_labels_classifier."),
    (r"^bbox_embed\.", "bbox_predictor."),
    (r"\.linear1\.", ".fc1."),
    (r"\.linear2\.", ".fc2."),
    (r"\.multihead_attn\.", ".encoder_attn."),
)


def hub_config(config: DetrConfig, categories: Sequence[Category]) -> dict:
    """``config.json`` for ``transformers.DetrConfig``, in the keys ``facebook/detr-resnet-50`` uses
    (read by transformers 4.x and 5.x): a timm ResNet backbone, whose parameter names are torchvision's."""
    if config.position_temperature != DetrConfig.position_temperature:
        raise ValueError(
            f"transformers' DETR has a fixed position temperature of {DetrConfig.position_temperature:g}; "
            f"this model uses {config.position_temperature:g}"
        )
    names = [c.name for c in categories]
    return {
        "architectures": ["DetrForObjectDetection"],
        "model_type": "detr",
        "backbone": config.backbone,
        "use_timm_backbone": True,
        "use_pretrained_backbone": False,  # the weights are in model.safetensors; nothing to download
        "dilation": config.dilation,
        "num_channels": 3,
        "d_model": config.hidden_dim,
        "encoder_layers": config.num_encoder_layers,
        "decoder_layers": config.num_decoder_layers,
        "encoder_attention_heads": config.num_heads,
        "decoder_attention_heads": config.num_heads,
        "encoder_ffn_dim": config.dim_feedforward,
        "decoder_ffn_dim": config.dim_feedforward,
        "dropout": config.dropout,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "activation_function": "relu",
        "num_queries": config.num_queries,
        "position_embedding_type": "sine",
        "auxiliary_loss": False,
        # transformers' labels are class indices; the dataset's category ids stay in our own checkpoint.
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)} if len(set(names)) == len(names) else {},
        "torch_dtype": "float32",
    }


def _preprocessor_config(image_size: tuple[int, int]) -> dict:
    """``DetrImageProcessor``'s settings for the resize and normalization :func:`detr.preprocess` applies."""
    return {
        "image_processor_type": "DetrImageProcessor",
        "format": "coco_detection",
        "do_resize": True,
        "size": {"shortest_edge": image_size[0], "longest_edge": image_size[1]},
        "resample": 2,  # bilinear
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "do_pad": True,
    }


def _save_hub_folder(model: DETR, state: dict[str, Tensor], folder: str, image_size: tuple[int, int]) -> None:
    config = hub_config(model.config, model.categories)
    metadata = {
        "format": "pt",  # transformers refuses safetensors files without it
        _METADATA_CONFIG: json.dumps(model.config.to_dict()),
        _METADATA_CATEGORIES: json.dumps(categories_to_list(model.categories)),
    }
    _write(f"{folder}/{HUB_WEIGHTS_FILE}", save_safetensors(to_hub_layout(state), metadata=metadata))
    _write(f"{folder}/config.json", json.dumps(config, indent=2).encode())
    _write(f"{folder}/preprocessor_config.json", json.dumps(_preprocessor_config(image_size), indent=2).encode())


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
    "COCO_CATEGORIES",
    "LAYOUTS",
    "CheckpointError",
    "from_pretrained",
    "hub_config",
    "check_weights",
    "read_state",
    "save_pretrained",
    "to_detr_layout",
    "to_hub_layout",
]
