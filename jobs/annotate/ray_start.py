"""The driver's Ray: ``RAY_ADDRESS`` (``ray job submit``), else a cluster already running on this
machine, else a local cluster of the job's own.

A cluster of the job's own lives only as long as the job, so it runs without Ray's dashboard,
which costs ~0.7 s of start-up and CPU all through the run (``benchmarks/RESULTS.md``); for the
dashboard, start a cluster first (``ray start --head``) and the job joins it.
"""

from __future__ import annotations

import importlib
import threading


def connect() -> None:
    """Connected to Ray, wherever the job runs."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False)  # ignored when joining a running cluster


def connect_while_importing(module: str) -> None:
    """:func:`connect`, with ``module`` imported in a thread meanwhile: on two cores torch and the
    model's code take ~2.5 s to load and Ray ~2.5 s to start, ~4 s together. ``ray.init`` itself
    stays in the calling thread: Ray's processes die with the thread that starts them
    (``PR_SET_PDEATHSIG``)."""
    loading = threading.Thread(target=importlib.import_module, args=(module,), name="import", daemon=True)
    loading.start()
    try:
        connect()
    finally:
        loading.join()
    importlib.import_module(module)  # loaded: instant; or its import error, raised here
