"""Writing small objects that concurrent readers must see whole: the steps a lease needs.

On S3 every PUT is atomic already; on a local filesystem a file is written under a temporary
name in the same folder and then linked or renamed into place, so a reader never finds it
empty or half written.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import fsspec

from .listing import is_s3
from .uris import is_local


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Write ``data`` to ``path`` unless something is there already; True if this call created it.

    Atomic on local filesystems (a hard link, which fails where the name exists) and on S3 (a
    conditional ``If-None-Match: *`` PUT, which AWS and recent S3-compatible stores honour).
    Elsewhere it checks, then writes: two writers racing within the same instant could both succeed.
    """
    try:
        if is_local(fs):
            fs.makedirs(fs._parent(path), exist_ok=True)
            with _written_aside(path, data) as aside:
                os.link(aside, path)
        elif is_s3(fs):
            fs.pipe_file(path, data, mode="create")
        else:
            if fs.exists(path):
                return False
            fs.pipe_file(path, data)
    except FileExistsError:
        return False
    return True


def replace_whole(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Overwrite ``path`` with ``data`` so that readers see the old content or the new, never a mix."""
    if is_local(fs):
        with _written_aside(path, data) as aside:
            os.replace(aside, path)
    else:
        fs.pipe_file(path, data)


@contextmanager
def _written_aside(path: str, data: bytes) -> Iterator[str]:
    """``data`` in a temporary file beside ``path`` (a name no listing of ``*.json`` matches),
    removed afterwards unless renamed away."""
    folder, name = os.path.split(path)
    aside = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    with open(aside, "xb") as stream:
        stream.write(data)
    try:
        yield aside
    finally:
        if os.path.exists(aside):
            os.unlink(aside)
