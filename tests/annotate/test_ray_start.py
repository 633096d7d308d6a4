"""jobs/annotate/ray_start.py: the driver's Ray, started while torch loads; a cluster of the job's own
has no dashboard. Decode workers run below the model actor's CPU priority."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.annotate.ray_start import connect_while_importing

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


def test_a_cluster_of_the_jobs_own_starts_without_the_dashboard():
    code = (
        "import ray, sys\n"
        "from jobs.annotate.ray_start import connect_while_importing\n"
        "connect_while_importing('jobs.annotate.pipeline')\n"
        "node = ray._private.worker._global_node\n"
        "print('torch' in sys.modules, ray.is_initialized(), bool(node.address_info['webui_url']))\n"
    )
    # RAY_ADDRESS=local: a new cluster, not the tests' own one running on this machine
    assert python(code, RAY_ADDRESS="local") == "True True False"


def test_decode_workers_take_the_lowest_cpu_priority():
    code = "import os\nfrom jobs.annotate.pipeline import _yield_to_the_model\n_yield_to_the_model()\nprint(os.nice(0))"
    assert python(code) == "19"  # below Ray's workers' 15, the model actor's
