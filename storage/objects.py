"""Reading many objects at once, each one's bytes or the exception that reading it raised."""

from __future__ import annotations

from collections.abc import Sequence

import fsspec


def read_objects(uris: Sequence[str]) -> list[bytes | Exception]:
    """The content of each URI, or the exception that reading it raised; concurrent per
    filesystem (s3fs fetches a list of keys with parallel requests)."""
    results: list[bytes | Exception] = [b""] * len(uris)
    groups: dict[int, tuple[fsspec.AbstractFileSystem, list[tuple[int, str]]]] = {}
    for index, uri in enumerate(uris):
        try:
            fs, path = fsspec.core.url_to_fs(uri)
        except Exception as error:  # noqa: BLE001 - an unusable URI becomes that row's error
            results[index] = error
            continue
        groups.setdefault(id(fs), (fs, []))[1].append((index, path))
    for fs, members in groups.values():
        contents = fs.cat([path for _, path in members], on_error="return")
        for index, path in members:
            results[index] = contents.get(path, FileNotFoundError(path))
    return results
