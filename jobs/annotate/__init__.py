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

from collections.abc import Sequence

from jobs import cli
from jobs.annotate.pipeline import main
from jobs.annotate.settings import AnnotateConfig, build_parser, config_from_args, parse_config

__all__ = ["AnnotateConfig", "build_parser", "config_from_args", "main", "parse_config", "run"]


def run(argv: Sequence[str] | None = None) -> int:
    """``python -m jobs.annotate``: the exit status."""
    return cli.run("annotate", build_parser, config_from_args, main, argv)
