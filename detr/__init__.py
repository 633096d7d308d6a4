"""DETR-ResNet-50 as a plain PyTorch package (no Ray inside).

Public API::

    model = detr.from_pretrained("detr-r50")            # or a path / fsspec URL / hf://facebook/detr-resnet-50
    batch = detr.preprocess([image1, image2])            # decoded RGB images of any sizes
    outputs = model(batch.pixel_values, batch.pixel_mask)
    results = detr.postprocess(outputs, batch.original_sizes, threshold=0.7)

Training parts come from :func:`detr.build` (model + matcher + criterion from a
:class:`DetrConfig` and a :class:`LossConfig`); published checkpoints are listed in
:data:`detr.weights.REGISTRY`.
"""

# ruff: noqa: F401 - the imports under TYPE_CHECKING are for type checkers; __all__ comes from _EXPORTS

import importlib
import importlib.util
from typing import TYPE_CHECKING

# Loaded on first use, so that the parts that need no torch (the weights registry and download,
# the config, the categories) import without it: a job can fetch and check its inputs first.
_EXPORTS = {
    "builder": ("build", "build_criterion"),
    "categories": ("COCO_CATEGORIES", "Category"),
    "checkpoint": ("CheckpointError", "check_weights", "from_pretrained", "save_pretrained"),
    "config": ("MAX_SIZE", "MIN_SIZE", "PRECISIONS", "DetrConfig", "LossConfig"),
    "criterion": ("SetCriterion",),
    "download": ("WeightsUnavailableError",),
    "image_decoding": ("ImageDecodeError", "decode_image", "decode_resized"),
    "inference": ("optimize_for_inference",),
    "matcher": ("HungarianMatcher",),
    "model": ("DETR",),
    "postprocessing": ("detection_records", "postprocess"),
    "precision": ("autocast_dtype",),
    "preprocessing": ("ImageBatch", "collate", "preprocess", "resize_image", "resize_to", "resized_shape"),
    "weights": ("REGISTRY", "PretrainedWeights"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)

if TYPE_CHECKING:  # the same names, for type checkers and editors (tests/detr/test_package.py keeps them equal)
    from .builder import build, build_criterion
    from .categories import COCO_CATEGORIES, Category
    from .checkpoint import CheckpointError, check_weights, from_pretrained, save_pretrained
    from .config import MAX_SIZE, MIN_SIZE, PRECISIONS, DetrConfig, LossConfig
    from .criterion import SetCriterion
    from .download import WeightsUnavailableError
    from .image_decoding import ImageDecodeError, decode_image, decode_resized
    from .inference import optimize_for_inference
    from .matcher import HungarianMatcher
    from .model import DETR
    from .postprocessing import detection_records, postprocess
    from .precision import autocast_dtype
    from .preprocessing import ImageBatch, collate, preprocess, resize_image, resize_to, resized_shape
    from .weights import REGISTRY, PretrainedWeights


def __getattr__(name: str) -> object:
    if name in _MODULE_OF:
        value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a module: ``detr.precision.autocast``
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
