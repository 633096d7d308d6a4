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

from .build import build, build_criterion
from .categories import COCO_CATEGORIES, Category
from .checkpoint import CheckpointError, check_weights, from_pretrained, save_pretrained
from .config import DetrConfig, LossConfig
from .criterion import SetCriterion
from .download import WeightsUnavailableError
from .image_decoding import ImageDecodeError, decode_image, decode_resized
from .inference import optimize_for_inference
from .matcher import HungarianMatcher
from .model import DETR
from .postprocess import detection_records, postprocess
from .precision import PRECISIONS, autocast_dtype
from .preprocess import MAX_SIZE, MIN_SIZE, ImageBatch, collate, preprocess, resize_image, resize_to, resized_shape
from .weights import REGISTRY, PretrainedWeights

__all__ = [
    "COCO_CATEGORIES",
    "DETR",
    "MAX_SIZE",
    "MIN_SIZE",
    "PRECISIONS",
    "REGISTRY",
    "Category",
    "CheckpointError",
    "DetrConfig",
    "HungarianMatcher",
    "ImageBatch",
    "ImageDecodeError",
    "LossConfig",
    "PretrainedWeights",
    "SetCriterion",
    "WeightsUnavailableError",
    "autocast_dtype",
    "build",
    "build_criterion",
    "check_weights",
    "collate",
    "decode_image",
    "decode_resized",
    "detection_records",
    "from_pretrained",
    "optimize_for_inference",
    "postprocess",
    "preprocess",
    "resize_image",
    "resize_to",
    "resized_shape",
    "save_pretrained",
]
