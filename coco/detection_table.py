"""The detections table: the Parquet schema ``jobs.annotate`` writes and scoring and COCO export read.

One row per input object::

    uri         string    the object's URI (s3://bucket/key, file:///abs/path, ...)
    width       int32     image width in pixels after EXIF orientation; null on error
    height      int32     image height in pixels after EXIF orientation; null on error
    detections  list<struct<category_id: int32,  dataset category id (COCO ids for detr-r50)
                            label: string,       category name
                            score: float32,      class probability, best first
                            box: list<float32>>> [x_min, y_min, x_max, y_max] absolute pixels
                                                 of the upright image; empty on error
    error       string    null on success, else a one-line reason ("truncated JPEG", ...)
    model       string    the weights that produced the row ("detr-r50-e632da11.pth@1a2b3c4d")
"""

from __future__ import annotations

import pyarrow as pa

DETECTION_TYPE = pa.struct(
    [
        pa.field("category_id", pa.int32()),
        pa.field("label", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("box", pa.list_(pa.float32())),
    ]
)
DETECTIONS_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("detections", pa.list_(DETECTION_TYPE)),
        pa.field("error", pa.string()),
        pa.field("model", pa.string()),
    ]
)
# What scoring and export read: the rest is for people and other tools.
SCORED_COLUMNS = ("uri", "detections", "error")
RETRYABLE_ERROR_PREFIX = "retryable: "  # the next run retries rows whose error starts so
