"""How the model package words a foreign exception for a one-line error message."""

from __future__ import annotations


def one_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none.

    (The jobs' ``storage.one_line`` says the same; ``detr`` keeps its own so that it imports
    nothing of the jobs' layers.)
    """
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
