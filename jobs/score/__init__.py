"""Score predictions against COCO ground truth: the 12 COCO bbox stats, per-category AP, PR curves.

    python -m jobs.score PREDICTIONS ANNOTATIONS [--output metrics.json] [--plot DIR] [--all-images]

Modules: :mod:`.settings` (the command line), :mod:`.report` (evaluate and report),
:mod:`.plots` (PNG charts). The parsing, joining and evaluation are the :mod:`coco` package's.
"""

from __future__ import annotations

from collections.abc import Sequence

from jobs import cli
from jobs.score.report import main
from jobs.score.settings import ScoreConfig, build_parser, config_from_args, parse_config

__all__ = ["ScoreConfig", "build_parser", "config_from_args", "main", "parse_config", "run"]


def run(argv: Sequence[str] | None = None) -> int:
    """``python -m jobs.score``: the exit status."""
    return cli.run("score", build_parser, config_from_args, main, argv)
