"""How the model package words errors: one line, and never a credential from a URI.

(The jobs' ``storage.one_line`` and ``storage.redact`` say the same; ``detr`` keeps its own so that
it imports nothing of the jobs' layers.)
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit, urlunsplit

_URL_SCHEMES = ("http", "https", "ftp", "sftp", "webdav", "webdavs")  # where ?query and user@ are not a name


def one_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def redact(uri: str) -> str:
    """``uri`` without the query string, fragment or user info a presigned URL carries its secret in."""
    scheme, _, rest = uri.partition("://")
    if not rest or scheme.lower() not in _URL_SCHEMES:
        return uri
    parts = urlsplit(uri)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def scrub(text: str, uri: str) -> str:
    """``text`` with ``uri`` (as given or URL-decoded, as libraries quote it) replaced by its redacted form."""
    shown = redact(uri)
    return text.replace(uri, shown).replace(unquote(uri), shown) if shown != uri else text
