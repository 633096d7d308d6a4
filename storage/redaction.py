"""Keeping credentials that ride inside URIs out of outputs, logs and error messages.

Two kinds of URI carry secrets: presigned HTTP(S) URLs (``?X-Amz-Signature=...``,
``?X-Goog-Signature=...``, Azure ``?sig=...``) and URLs with user info (``https://user:pass@host``).
Only URL schemes whose query and user info mean that get stripped: an ``s3://`` or local path may
legitimately contain ``?`` or ``@`` in an object name.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

# Schemes whose "?query" is a query and "user:pass@" is user info, not part of an object name.
_URL_SCHEMES = ("http", "https", "ftp", "sftp", "ssh", "webdav", "webdavs")


def redact(uri: str) -> str:
    """``uri`` without a query string, fragment or user info where its scheme has them.

    ``https://host/a.jpg?X-Amz-Signature=...`` -> ``https://host/a.jpg``;
    ``https://user:pass@host/a.jpg`` -> ``https://host/a.jpg``; ``s3://b/k?x`` is unchanged.
    """
    scheme, _, rest = uri.partition("://")
    if not rest or scheme.lower() not in _URL_SCHEMES:
        return uri
    parts = urlsplit(uri)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host  # IPv6
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def carries_secret(uri: str) -> bool:
    """Whether :func:`redact` would change ``uri`` (a query string or user info that may be secret)."""
    return redact(uri) != uri
