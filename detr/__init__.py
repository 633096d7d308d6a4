"""DETR-ResNet-50 as a plain PyTorch package (no Ray inside).

Public API::

    model = detr.from_pretrained("detr-r50")            # or a path / fsspec URL / hf://facebook/detr-resnet-50
    batch = detr.preprocess([image1, image2])            # decoded RGB images of any sizes
    outputs = model(batch.pixel_values, batch.pixel_mask)
    results = detr.postprocess(outputs, batch.original_sizes, threshold=0.7)
"""

from .categories import COCO_CATEGORIES, Category
from .checkpoint import CheckpointError, from_pretrained, save_pretrained
from .config import DetrConfig
from .criterion import SetCriterion
from .download import WeightsUnavailableError
from .inference import optimize_for_inference
from .matcher import HungarianMatcher
from .model import DETR
from .postprocess import detection_records, postprocess
from .preprocess import ImageBatch, collate, preprocess, resize_image, resize_to, resized_shape

__all__ = [
    "COCO_CATEGORIES", "Category", "CheckpointError", "DETR", "DetrConfig", "HungarianMatcher", "ImageBatch",
    "SetCriterion", "WeightsUnavailableError", "collate", "detection_records", "from_pretrained", "optimize_for_inference", "postprocess",
    "preprocess", "resize_image", "resize_to", "resized_shape", "save_pretrained",
]
