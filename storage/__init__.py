"""Object storage as the jobs see it: a URI in, an fsspec (or pyarrow) filesystem and a path out.

Every job reads and writes through here, so local folders, ``s3://`` (and S3-compatible stores
through ``AWS_ENDPOINT_URL``), ``gs://`` and any other fsspec protocol behave the same way.
This package imports neither torch, Ray nor the model.
"""

from .errors import StorageError, one_line
from .exclusive import create_exclusive, replace_whole
from .faults import is_transient
from .listing import KeyRange, folder_exists, iter_folder, iter_sorted, split_ranges
from .objects import (
    DEFAULT_MAX_OBJECT_BYTES,
    ObjectTooLargeError,
    ReadPolicy,
    TransientReadError,
    iter_objects,
    read_objects,
)
from .redaction import carries_secret, redact
from .uris import arrow_filesystem, filesystem_for, is_local, read_bytes, write_bytes

__all__ = [
    "DEFAULT_MAX_OBJECT_BYTES",
    "KeyRange",
    "ObjectTooLargeError",
    "ReadPolicy",
    "StorageError",
    "TransientReadError",
    "arrow_filesystem",
    "carries_secret",
    "create_exclusive",
    "filesystem_for",
    "folder_exists",
    "is_local",
    "is_transient",
    "iter_folder",
    "iter_objects",
    "iter_sorted",
    "one_line",
    "read_bytes",
    "read_objects",
    "redact",
    "replace_whole",
    "split_ranges",
    "write_bytes",
]
