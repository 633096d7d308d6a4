"""The pipeline's CPU stage: read a block of URIs, decode and resize each image for the model.

Decoding itself is :func:`detr.decode_resized` (EXIF upright, any mode to RGB, large JPEGs at
reduced scale, one-line reasons for anything that is not a usable image); here each URI becomes
one row of :data:`PREPARED_SCHEMA`, so the model actors only normalize and pad.
"""

from __future__ import annotations

import pyarrow as pa

from detr.image_decoding import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_resized
from storage import one_line, read_objects

# The CPU stage's output, one row per input URI; ``pixels`` holds the resized image as
# uint8 CHW bytes (empty on error), so blocks stay plain Arrow.
PREPARED_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string()),
        pa.field("width", pa.int32()),  # original (EXIF-upright) width; null on error
        pa.field("height", pa.int32()),
        pa.field("error", pa.string()),  # null on success
        pa.field("resized_height", pa.int32()),  # 0 on error
        pa.field("resized_width", pa.int32()),
        pa.field("pixels", pa.binary()),
    ]
)


def prepare_images(
    batch: pa.Table,
    *,
    min_size: int,
    max_size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    fail_on_error: bool = False,
    reduced_jpeg: bool = True,
) -> pa.Table:
    """The pipeline's CPU stage: read, decode and resize a batch of images.

    Args:
        batch: a table with a ``uri`` string column.
        min_size, max_size: DETR's resize rule (see :func:`detr.resized_shape`).
        max_pixels: the decompression-bomb limit.
        fail_on_error: raise :class:`ImageDecodeError` naming the first bad object instead of
            returning an error row (``--fail-on-error``).
        reduced_jpeg: decode large JPEGs at reduced scale (see :func:`decode_resized`).
    Returns:
        A table in :data:`PREPARED_SCHEMA`, one row per input row, in input order.
    """
    uris = batch.column("uri").to_pylist()
    columns: dict[str, list] = {name: [] for name in PREPARED_SCHEMA.names}
    for uri, content in zip(uris, read_objects(uris)):
        try:
            if isinstance(content, Exception):
                raise ImageDecodeError(f"unreadable: {one_line(content)}")
            resized, (height, width) = decode_resized(  # uint8 (3, h, w)
                content, min_size=min_size, max_size=max_size, max_pixels=max_pixels, reduced_jpeg=reduced_jpeg
            )
        except ImageDecodeError as error:
            if fail_on_error:
                raise ImageDecodeError(f"{uri}: {error.reason}") from None
            row = (uri, None, None, error.reason, 0, 0, b"")
        else:
            row = (uri, width, height, None, resized.shape[1], resized.shape[2], resized.contiguous().numpy().tobytes())
        for name, value in zip(PREPARED_SCHEMA.names, row):
            columns[name].append(value)
    return pa.table(columns, schema=PREPARED_SCHEMA)
