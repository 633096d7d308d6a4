"""Annotate an image archive with DETR: object storage -> Ray Data -> Parquet.

    python -m jobs.annotate INPUT OUTPUT [options]
    ray job submit -- python -m jobs.annotate s3://bucket/images s3://bucket/detections

Modules, in the order data flows: :mod:`.settings` (the command line and its config),
:mod:`.listing`, :mod:`.decoding`, :mod:`.actor_plan`, :mod:`.detector`, :mod:`.output`
(resume and summary), :mod:`.startup_clock`, :mod:`.render`; :mod:`.pipeline` wires them into one
Ray Data stream, on the Ray that :mod:`.ray_start` finds or starts.

Resume: every run writes files named ``annotations-<run id>-...parquet``; a re-run with the
same OUTPUT skips every URI already present in a complete file, so killing a job and
starting it again ends with every input exactly once.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

from jobs import cli

if TYPE_CHECKING:
    from jobs.annotate.settings import AnnotateConfig

__all__ = ["AnnotateConfig", "build_parser", "config_from_args", "main", "parse_config", "run"]
# Loaded on first use: the listing workers import this package, and need neither torch nor the model.
_EXPORTS = {"main": "pipeline", **{name: "settings" for name in __all__ if name not in ("main", "run")}}


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def run(argv: Sequence[str] | None = None) -> int:
    """``python -m jobs.annotate``: the exit status."""
    from jobs.annotate.settings import build_parser, config_from_args

    launched = time.time()
    return cli.run("annotate", build_parser, config_from_args, partial(_start_and_run, started=launched), argv)


def _start_and_run(config: AnnotateConfig, started: float) -> object:
    """:func:`main`, with Ray starting while the driver loads torch (:mod:`.ray_start`)."""
    from detr.download import local_path
    from jobs.annotate import ray_start
    from jobs.annotate.listing import check_input

    # Wrong INPUT or unavailable weights fail at once, before Ray starts (neither needs torch).
    check_input(config.input)
    local_path(config.weights)  # downloaded into the cache, where main() then checks it
    ray_start.connect_while_importing(f"{__name__}.pipeline")
    from jobs.annotate.pipeline import main

    return main(config, started=started)
