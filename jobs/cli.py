"""The one shape of every command: ``build_parser()``, a config dataclass, ``main(config) -> result``.

:func:`run` is the whole command-line layer: it parses, turns the arguments into the job's frozen
config, runs ``main`` and prints the result's summary. A user error (bad flag, missing input,
unusable weights or annotations) is one line on stderr and exit status 2; a job that ran but
could not finish (a bad image under ``--fail-on-error``, a diverged training run) is one line and
exit status 1. Nothing past this layer sees an argparse Namespace.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn, Protocol, TypeVar

from storage import StorageError, one_line


class UserError(ValueError):
    """Base of every job's input errors: the message is one line that names the value at fault."""


class JobFailedError(RuntimeError):
    """The job started but could not finish; ``headline`` says how (``error``, ``training failed``)."""

    headline = "error"


class Result(Protocol):
    def summary(self) -> str:
        """What the job did, for stdout."""


Config = TypeVar("Config")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each option's default, except where it is None: those help texts explain the
    default the job works out at run time, and "(default: None)" would contradict them."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def run(
    name: str,
    build_parser: Callable[[], argparse.ArgumentParser],
    to_config: Callable[[argparse.Namespace], Config],
    main: Callable[[Config], Result],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the job and return its exit status."""
    args = build_parser().parse_args(argv)
    try:
        result = main(to_config(args))
    except JobFailedError as error:
        print(f"{name}: {error.headline}: {one_line(error)}", file=sys.stderr)
        return 1
    except user_errors() as error:
        print(f"{name}: error: {one_line(error)}", file=sys.stderr)
        return 2
    print(result.summary(), flush=True)
    return 0


def exit_process(status: int) -> NoReturn:
    """End ``python -m jobs.<name>`` with ``status`` once Ray is shut down and output flushed,
    without the interpreter's teardown of torch's and Ray's modules: ~1 s on two cores that the
    user would wait for after the summary line (``benchmarks/RESULTS.md``)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        _stop_autoscaler_monitor(ray)
        ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _stop_autoscaler_monitor(ray) -> None:
    """Kill the autoscaler monitor of a cluster this process started, before ``ray.shutdown()``
    stops the rest: Ray (2.60) stops the GCS first and then signals the monitor, whose handler
    waits on the GCS that is gone until Ray kills it a second later. Killed first, it costs
    nothing (``benchmarks/RESULTS.md``). A job that joined a running cluster started no monitor."""
    node = getattr(ray._private.worker, "_global_node", None)
    if node is not None and hasattr(node, "kill_monitor"):
        node.kill_monitor(check_alive=False)


def user_errors() -> tuple[type[Exception], ...]:
    """The error bases that mean "fix your input": ours, and those of the library layers, which
    cannot import this module. The model's and the COCO reader's are included only once their
    module is imported (scoring never imports torch; the command-line layer loads no job's
    libraries before it parses), which is also the only way they can have been raised."""
    errors: list[type[Exception]] = [UserError, StorageError]
    for module, name in (
        ("coco.annotations", "CocoFormatError"),
        ("detr.checkpoint", "CheckpointError"),
        ("detr.download", "WeightsUnavailableError"),
    ):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)
