"""Which storage errors are transient (worth reading again later) and how they read in one line.

Transient: throttling (S3 ``SlowDown``, HTTP 429), 5xx from the store, request timeouts and
dropped or reset connections. Permanent: everything else (missing object, access denied, a
bad request). Clients wrap errors in their own types (s3fs turns botocore's ``ClientError`` into
``OSError`` with the original as ``__cause__``; aiohttp's reset hides under botocore's
``EndpointConnectionError`` as ``__context__``), so the whole exception chain is examined.
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Iterator
from http.client import IncompleteRead

from .errors import one_line

# Error codes stores send for "try again" with a status that does not say so (S3 RequestTimeout
# is a 400, OperationAborted a 409) or that other stores use for throttling.
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
        "PriorRequestNotComplete",
    }
)


@functools.cache  # imported on first use: botocore and aiohttp take a while to import
def _client_types() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(transient, never transient) exception types of the HTTP clients fsspec uses, when installed."""
    transient: list[type[BaseException]] = [ConnectionError, TimeoutError, IncompleteRead]
    permanent: list[type[BaseException]] = []
    try:
        import botocore.exceptions as botocore

        transient += [botocore.HTTPClientError, botocore.ConnectionError, botocore.IncompleteReadError]
        permanent.append(botocore.SSLError)  # a certificate problem does not heal by itself
    except ImportError:
        pass
    try:
        import aiohttp

        transient += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
        permanent.append(aiohttp.ClientSSLError)
    except ImportError:
        pass
    return tuple(transient), tuple(permanent)


def is_transient(error: BaseException) -> bool:
    """True when reading again later may succeed: throttling, 5xx, timeouts, dropped connections."""
    transient_types, permanent_types = _client_types()
    for link in _chain(error):
        status, code = http_status(link)
        if code in TRANSIENT_CODES or (status is not None and (status >= 500 or status == 429)):
            return True
        if isinstance(link, permanent_types):
            return False
        if isinstance(link, transient_types):
            return True
    return False


def is_range_not_satisfiable(error: BaseException) -> bool:
    """HTTP 416: what S3 answers a ranged read of an empty object."""
    return any(http_status(link)[0] == 416 or http_status(link)[1] == "InvalidRange" for link in _chain(error))


def fault_reason(error: BaseException) -> str:
    """A short name for a transient fault: ``HTTP 503 SlowDown``, ``connection reset``, ``timed out``,
    else the error's first line."""
    for link in _chain(error):
        status, code = http_status(link)
        if status is not None or code is not None:
            return " ".join(str(part) for part in ("HTTP", status, code) if part is not None)
    if any(
        isinstance(link, ConnectionResetError) or getattr(link, "errno", None) == errno.ECONNRESET
        for link in _chain(error)
    ):
        return "connection reset"
    if any(isinstance(link, TimeoutError) for link in _chain(error)):
        return "timed out"
    return one_line(error)


def http_status(error: BaseException) -> tuple[int | None, str | None]:
    """(HTTP status, error code) an exception carries: botocore's ``response`` dict, aiohttp's
    ``status``, gcsfs's ``code``; (None, None) for anything else."""
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = response.get("Error", {}).get("Code")
        return (status if isinstance(status, int) else None), (str(code) if code else None)
    for name in ("status", "code"):
        status = getattr(error, name, None)
        if isinstance(status, int) and 100 <= status < 600:
            return status, None
    return None, None


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error, then its causes and contexts, each once."""
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__
