"""Resolving a weights ``source`` to a local file: short names, fsspec URLs, an on-disk cache.

Remote files are downloaded once into the cache (``$DETR_RAY_CACHE``, default
``~/.cache/detr-ray``), written atomically, and verified before they are kept:

* the official DETR file names carry the first 8 hex digits of their SHA-256;
* Hugging Face hub files (``hf://ORG/REPO``, resolved against ``$HF_ENDPOINT``, default
  ``https://huggingface.co``) are checked against the SHA-256 the hub sends in its headers, and
  refused when it sends none;
* other URLs (``s3://``, ``gs://``, plain ``https://``) are trusted as their store serves them.

A download that fails, or disagrees with its checksum, raises a one-line
:class:`WeightsUnavailableError` and leaves nothing in the cache.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from email.message import Message
from pathlib import Path

import fsspec

from .errors import one_line, redact, scrub
from .weights import SHORT_NAMES, registered

_HUB_DEFAULT = "https://huggingface.co"
_HUB_FILE = "{endpoint}/{repo}/resolve/main/model.safetensors"


class WeightsUnavailableError(RuntimeError):
    """The weights could not be found, downloaded or verified."""


def cache_dir() -> Path:
    return Path(os.environ.get("DETR_RAY_CACHE", Path.home() / ".cache" / "detr-ray"))


def hub_endpoint() -> str:
    """The hub or its mirror: ``$HF_ENDPOINT``, the variable huggingface_hub reads too."""
    return os.environ.get("HF_ENDPOINT", _HUB_DEFAULT).rstrip("/")


def resolve_url(source: str) -> str:
    """Registry names (:mod:`detr.weights`) and ``hf://org/repo`` to download URLs; anything else as is."""
    entry = registered(source)
    if entry is not None:
        source = entry.source
    if source.startswith("hf://"):
        return _HUB_FILE.format(endpoint=hub_endpoint(), repo=source[len("hf://") :].strip("/"))
    if "://" not in source and not Path(source).exists() and re.fullmatch(r"detr-[\w-]+", source):
        raise WeightsUnavailableError(
            f"unknown weights name {source!r}; known names: {list(SHORT_NAMES)}, hf://ORG/REPO, or a file path/URI"
        )
    return source


def local_path(source: str) -> Path:
    """A local file holding the weights ``source`` names, downloading into the cache if needed."""
    url = resolve_url(source)
    protocol, path = fsspec.core.split_protocol(url)
    if protocol in (None, "file", "local"):
        local = Path(path)
        if not local.is_file():
            raise WeightsUnavailableError(f"weights file not found: {local}")
        return local
    # The folder is a hash of the full URL; the file name carries no query string (a presigned
    # URL's signature must not end up in file names).
    cached = cache_dir() / hashlib.sha256(url.encode()).hexdigest()[:16] / _file_name(url)
    if not cached.is_file():
        _download(url, cached)
    return cached


def expected_sha256_prefix(url: str) -> str | None:
    """The hash prefix a registry entry or an official-style file name carries (``detr-r50-e632da11.pth``)."""
    entry = registered(url)
    if entry is not None and entry.sha256_prefix:
        return entry.sha256_prefix
    match = re.search(r"-([0-9a-f]{8,})\.pth$", url)
    return match.group(1) if match else None


def _is_hub(url: str) -> bool:
    # By URL, not by ``hf://``: a resolve URL pasted from the hub's page is verified the same way.
    return url.startswith((hub_endpoint() + "/", _HUB_DEFAULT + "/")) and "/resolve/" in url


def _download(url: str, destination: Path) -> None:
    if _is_hub(url):
        expected = _hub_sha256(url, destination)
    else:
        expected = expected_sha256_prefix(url)  # None: trusted as served (s3://, gs://, ...)
    destination.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=destination.parent, delete=False) as tmp:
        try:
            # Streaming (block_size=0) for HTTP: many servers do not support range requests.
            options = {"block_size": 0} if url.startswith(("http://", "https://")) else {}
            with fsspec.open(url, "rb", **options) as remote:
                while chunk := remote.read(1 << 22):
                    digest.update(chunk)
                    tmp.write(chunk)
        except Exception as error:  # noqa: BLE001 - any failure means "not available", say why
            os.unlink(tmp.name)
            raise _unavailable(url, destination, error) from None
    if expected and not digest.hexdigest().startswith(expected):
        os.unlink(tmp.name)
        raise WeightsUnavailableError(
            f"checksum mismatch for {redact(url)}: sha256 {digest.hexdigest()[:12]}..., expected {expected[:12]}..."
        )
    os.replace(tmp.name, destination)


def _hub_sha256(url: str, destination: Path) -> str:
    """The SHA-256 the hub vouches for: ``X-Linked-Etag`` on its redirect to the LFS blob (read
    before following it), else a 64-hex ``ETag``; a 40-hex ETag is a git blob sha1, not a checksum.
    Other redirects (a renamed repo answers with one) are followed until an answer carries it."""
    target = url
    try:
        for _ in range(5):
            status, headers = _head(target)
            for value in (headers.get("X-Linked-Etag"), headers.get("ETag")):
                if match := re.fullmatch(r'(?:W/)?"?([0-9a-f]{64})"?', (value or "").strip(), re.IGNORECASE):
                    return match.group(1).lower()
            if not 300 <= status < 400 or "Location" not in headers:
                break
            target = urllib.parse.urljoin(target, headers["Location"])
    except Exception as error:  # noqa: BLE001 - offline or refused: the same one-line message
        raise _unavailable(url, destination, error) from None
    raise WeightsUnavailableError(
        f"cannot verify weights from {redact(url)}: the hub sent no SHA-256 for it, so it was not cached; "
        f"download it yourself and pass the local file (e.g. --weights /path/to/{_file_name(url)})"
    )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # the checksum is on the redirect itself, not on the CDN's answer


def _head(url: str) -> tuple[int, Message]:
    """Status and headers of a HEAD request, redirects not followed."""
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, method="HEAD"), timeout=60) as response:
            return response.status, response.headers
    except urllib.error.HTTPError as error:
        if 300 <= error.code < 400:
            return error.code, error.headers
        raise


def _unavailable(url: str, destination: Path, error: BaseException) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        scrub(
            f"cannot download weights from {url} ({_reason(error)}); when offline, download it elsewhere "
            f"and pass the local file (e.g. --weights /path/to/{_file_name(url)}) or put it at {destination}",
            url,
        )
    )


def _file_name(url: str) -> str:
    return Path(urllib.parse.urlsplit(url).path if "://" in url else url).name


def _reason(error: BaseException) -> str:
    """The root cause in a few words: fsspec wraps e.g. a DNS failure in a bare FileNotFoundError(url)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    inner = [a for a in getattr(error, "args", ()) if isinstance(a, BaseException)]
    text = one_line(inner[-1] if inner else error)
    return text if text == type(error).__name__ else f"{type(error).__name__}: {text}"
