"""jobs/annotate/ray_start.py: the driver's Ray, started while torch loads; a cluster of the job's own
has no dashboard. Decode workers run below the model actor's CPU priority."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.annotate.ray_start import OWN_CLUSTER_SYSTEM_CONFIG, connect_while_importing

ROOT = Path(__file__).resolve().parents[2]


def test_the_module_loads_while_ray_connects(ray_cluster):
    sys.modules.pop("json.tool", None)
    connect_while_importing("json.tool")
    assert "json.tool" in sys.modules and ray_cluster.is_initialized()


def test_an_import_error_reaches_the_caller(ray_cluster):
    with pytest.raises(ModuleNotFoundError, match="no_such_module_here"):
        connect_while_importing("no_such_module_here")


def python(code: str, **env: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_a_cluster_of_the_jobs_own_starts_without_the_dashboard_and_metrics():
    code = (
        "import ray, sys\n"
        "from jobs.annotate.ray_start import connect_while_importing\n"
        "connect_while_importing('jobs.annotate.pipeline')\n"
        "node = ray._private.worker._global_node\n"
        "print('torch' in sys.modules, ray.is_initialized(), bool(node.address_info['webui_url']))\n"
        "print(sorted(k for k, v in node._config.items() if v in (False, 0)))\n"
    )
    # RAY_ADDRESS=local: a new cluster, not the tests' own one running on this machine
    started, settings_off = python(code, RAY_ADDRESS="local").splitlines()
    assert started == "True True False"
    assert settings_off == str(sorted(OWN_CLUSTER_SYSTEM_CONFIG))  # no metrics, task events or loop stats


def test_decode_workers_take_the_lowest_cpu_priority():
    code = (
        "import os\nfrom jobs.annotate.decoding import yield_to_the_model\nyield_to_the_model()\n"
        "print(os.nice(0), os.sched_getscheduler(0) == getattr(os, 'SCHED_IDLE', None))"
    )
    # below Ray's workers' 15, the model actor's; on Linux, only on the cores it leaves idle
    assert python(code) == f"19 {sys.platform.startswith('linux')}"


EXIT_OWN_CLUSTER = """
import ray
from jobs import cli
from jobs.annotate.ray_start import connect

connect()
node = ray._private.worker._global_node
pids = [info.process.pid for infos in node.all_processes.values() for info in infos]
print(*pids)
(monitor,) = node.all_processes["monitor"]
cli._stop_autoscaler_monitor(ray)
monitor.process.wait(timeout=10)  # killed at once, not asked to stop
print(ray.get(ray.remote(lambda: "still up").remote()), flush=True)  # the cluster itself keeps running
cli.exit_process(3)
"""


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_exit_takes_down_the_jobs_own_cluster_monitor_first():
    """exit_process stops the autoscaler monitor before ray.shutdown() stops the GCS it would wait
    on; the cluster still works in between, and nothing of it outlives the process."""
    done = subprocess.run(
        [sys.executable, "-c", EXIT_OWN_CLUSTER],
        cwd=ROOT,
        env={**os.environ, "RAY_ADDRESS": "local"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr[-2000:]
    pids, answer = done.stdout.split("\n")[:2]
    assert answer == "still up"
    assert "autoscaler failed" not in done.stderr
    assert not [pid for pid in map(int, pids.split()) if _running(pid)]
