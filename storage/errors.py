"""How storage problems reach the user: one exception type, one line of text."""

from __future__ import annotations


class StorageError(ValueError):
    """A URI that cannot be used (unsupported, missing, unreadable); the message names it."""


def one_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none.

    Storage libraries put tracebacks, XML bodies and request ids after the first line; users
    get the line that says what happened.
    """
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
