"""Annotate an image archive with DETR: object storage -> Ray Data -> Parquet.

    python -m jobs.annotate INPUT OUTPUT [options]
    ray job submit -- python -m jobs.annotate s3://bucket/images s3://bucket/detections

Modules, in the order data flows: :mod:`.settings` (the command line and its config),
:mod:`.listing`, :mod:`.decoding`, :mod:`.actor_plan`, :mod:`.detector`, :mod:`.output`
(resume and summary), :mod:`.render`; :mod:`.pipeline` wires them into one Ray Data stream.

Resume: every run writes files named ``annotations-<run id>-...parquet``; a re-run with the
same OUTPUT skips every URI already present in a complete file, so killing a job and
starting it again ends with every input exactly once.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from jobs import cli

__all__ = ["AnnotateConfig", "build_parser", "config_from_args", "main", "parse_config", "run"]
# Loaded on first use: the listing workers import this package, and need neither torch nor the model.
_EXPORTS = {"main": "pipeline", **{name: "settings" for name in __all__ if name not in ("main", "run")}}


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def run(argv: Sequence[str] | None = None) -> int:
    """``python -m jobs.annotate``: the exit status."""
    from jobs.annotate.pipeline import main
    from jobs.annotate.settings import build_parser, config_from_args

    return cli.run("annotate", build_parser, config_from_args, main, argv)
