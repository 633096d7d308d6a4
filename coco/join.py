"""The one rule that joins an input URI to a ground-truth image: by trailing path components.

A ground-truth ``images[].file_name`` with k path components (``a/b.jpg`` has 2) matches an input
URI whose last k path components are the same, so ``s3://bucket/val2017/000000000139.jpg``
matches ``000000000139.jpg`` and ``val2017/000000000139.jpg``. When several file names match one
URI the longest wins. Scoring, COCO export and fine-tuning validation all use it.
"""

from __future__ import annotations

import numpy as np

from .annotations import CocoFormatError, CocoInstances

JOIN_RULE = (
    "Rows are joined to ground-truth images by file name: a file_name with k path components "
    "matches an input URI whose last k path components are equal (s3://b/val2017/1.jpg matches "
    "'1.jpg' and 'val2017/1.jpg'); the longest matching file_name wins."
)
_AMBIGUOUS = -2


def match_uris_to_images(uris: list[str], instances: CocoInstances) -> np.ndarray:
    """Ground-truth image id for each input URI, -1 where none matches.

    Args:
        uris: input URIs, e.g. ``s3://bucket/val2017/000000000139.jpg``.
        instances: supplies ``file_names`` and ``image_ids``.
    Returns:
        ``int64[len(uris)]``.
    Raises:
        CocoFormatError: a URI matches a file name that several images share.
    """
    by_name: dict[str, int] = {}
    for image_id, file_name in zip(instances.image_ids.tolist(), instances.file_names, strict=True):
        key = "/".join(part for part in file_name.split("/") if part not in ("", "."))
        by_name[key] = _AMBIGUOUS if key in by_name else image_id
    max_depth = max((key.count("/") + 1 for key in by_name), default=1)
    matched = np.full(len(uris), -1, dtype=np.int64)
    for index, uri in enumerate(uris):
        parts = [part for part in uri.split("://", 1)[-1].split("/") if part]
        for depth in range(min(max_depth, len(parts)), 0, -1):
            image_id = by_name.get("/".join(parts[-depth:]))
            if image_id == _AMBIGUOUS:
                raise CocoFormatError(
                    f"{instances.uri}: file_name {'/'.join(parts[-depth:])!r} (matching {uri}) "
                    "belongs to several images"
                )
            if image_id is not None:
                matched[index] = image_id
                break
    return matched


def first_repeated(values: np.ndarray) -> int:
    """The smallest value that occurs more than once in ``values`` (which must have one)."""
    unique, counts = np.unique(values, return_counts=True)
    return int(unique[np.argmax(counts > 1)])
