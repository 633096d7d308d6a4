"""The driver's Ray: ``RAY_ADDRESS`` (``ray job submit``), else a cluster already running on this
machine, else a local cluster of the job's own (also when ``RAY_ADDRESS=local``).

A cluster of the job's own lives only as long as the job and nothing watches it, so it runs
without Ray's dashboard (~0.7 s of start-up), metrics or task events, which every Ray process
would otherwise record and send all through the run: CPU taken from the model on a small
machine (``benchmarks/RESULTS.md``). For the dashboard, start a cluster first
(``ray start --head``) and the job joins it, as it is.
"""

from __future__ import annotations

import importlib
import os
import threading

# Ray settings of a cluster of the job's own: what only a dashboard or a metrics scraper would read.
OWN_CLUSTER_SYSTEM_CONFIG = {
    "enable_metrics_collection": False,
    "task_events_report_interval_ms": 0,  # no task events (the state API and ray.timeline() read them)
    "event_stats": False,  # timing of Ray's own event-loop handlers
}


def connect() -> None:
    """Connected to Ray, wherever the job runs."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS") != "local":
        try:
            ray.init(address="auto")  # RAY_ADDRESS, else a cluster running on this machine
            return
        except ConnectionError:
            pass  # none: start one
    ray.init(address="local", include_dashboard=False, _system_config=OWN_CLUSTER_SYSTEM_CONFIG)


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
