"""COCO files and the detection tables scored against them: one parser, one join rule, one evaluator.

* :mod:`coco.annotations` - the one reader of instances JSON (:class:`CocoFormatError` for every
  problem with any COCO input);
* :mod:`coco.join` - the rule that joins input URIs to ground-truth images by file name;
* :mod:`coco.evaluation` - bbox AP equal to pycocotools' ``COCOeval``, vectorized;
* :mod:`coco.predictions` - detections to score, from annotate's Parquet or a results JSON;
* :mod:`coco.detection_table` - the Parquet schema annotate writes;
* :mod:`coco.boxes` - pixel box conversions.

Imports neither torch, Ray nor the model: scoring stays a NumPy job.
"""

from .annotations import CocoFormatError, CocoInstances, parse_instances, read_instances, read_json
from .boxes import xywh_to_xyxy, xyxy_to_xywh
from .detection_table import DETECTION_TYPE, DETECTIONS_SCHEMA, RETRYABLE_ERROR_PREFIX
from .evaluation import STAT_NAMES, CocoEvaluation, DetectionBoxes, GroundTruthBoxes, evaluate_boxes, format_stats
from .join import JOIN_RULE, match_uris_to_images
from .predictions import Predictions, load_predictions

__all__ = [
    "DETECTIONS_SCHEMA",
    "DETECTION_TYPE",
    "JOIN_RULE",
    "RETRYABLE_ERROR_PREFIX",
    "STAT_NAMES",
    "CocoEvaluation",
    "CocoFormatError",
    "CocoInstances",
    "DetectionBoxes",
    "GroundTruthBoxes",
    "Predictions",
    "evaluate_boxes",
    "format_stats",
    "load_predictions",
    "match_uris_to_images",
    "parse_instances",
    "read_instances",
    "read_json",
    "xywh_to_xyxy",
    "xyxy_to_xywh",
]
