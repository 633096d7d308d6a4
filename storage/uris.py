"""URIs to filesystems, and whole-object reads and writes."""

from __future__ import annotations

import fsspec
import pyarrow.fs
from fsspec.implementations.local import LocalFileSystem

from .errors import StorageError, one_line


def filesystem_for(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path within it (credentials and endpoint from
    the environment, e.g. ``AWS_ENDPOINT_URL`` for MinIO/Ceph/R2).

    Without a listings cache: the jobs list folders other processes write into (OUTPUT, the done
    index), and a cached listing makes s3fs answer "not found" for a file written since.
    """
    try:
        if "://" not in uri or uri.startswith(("file://", "local://")):
            return fsspec.core.url_to_fs(uri)
        return fsspec.core.url_to_fs(uri, use_listings_cache=False)
    except (ValueError, ImportError) as error:  # unknown protocol, or its package is not installed
        raise StorageError(f"{uri}: unsupported URI ({one_line(error)})") from None


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def arrow_filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """A pyarrow filesystem and path for Ray Data's and Ray Train's readers and writers.

    Remote filesystems are wrapped fsspec ones: pyarrow's own ``S3FileSystem`` ignores
    ``AWS_ENDPOINT_URL``, so S3-compatible stores would silently be AWS.
    """
    fs, path = filesystem_for(uri)
    if is_local(fs):
        return pyarrow.fs.LocalFileSystem(), path
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path


def read_bytes(uri: str) -> bytes:
    """The whole object at ``uri``.

    Raises:
        StorageError: missing, a folder, or unreadable; the message names ``uri``.
    """
    fs, path = filesystem_for(uri)
    try:
        with fs.open(path, "rb") as stream:
            return stream.read()
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such file") from None
    except IsADirectoryError:
        raise StorageError(f"{uri}: is a folder, expected a file") from None
    except OSError as error:
        raise StorageError(f"{uri}: cannot be read ({one_line(error)})") from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri``, creating the parent folder of a local path.

    Raises:
        StorageError: the object cannot be written; the message names ``uri``.
    """
    fs, path = filesystem_for(uri)
    try:
        if is_local(fs):
            fs.makedirs(fs._parent(path), exist_ok=True)
        fs.pipe_file(path, data)
    except OSError as error:
        raise StorageError(f"{uri}: cannot be written ({one_line(error)})") from None
