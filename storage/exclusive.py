"""Creating an object only if it does not exist yet: the one atomic step a lease needs."""

from __future__ import annotations

import fsspec

from .listing import is_s3
from .uris import is_local


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Write ``data`` to ``path`` unless something is there already; True if this call created it.

    Atomic on local filesystems (``O_EXCL``) and on S3 (a conditional ``If-None-Match: *`` PUT,
    which AWS and recent S3-compatible stores honour). Elsewhere it checks, then writes: two
    writers racing within the same instant could both succeed.
    """
    try:
        if is_local(fs):
            fs.makedirs(fs._parent(path), exist_ok=True)
            with open(path, "xb") as stream:
                stream.write(data)
        elif is_s3(fs):
            fs.pipe_file(path, data, mode="create")
        else:
            if fs.exists(path):
                return False
            fs.pipe_file(path, data)
    except FileExistsError:
        return False
    return True
