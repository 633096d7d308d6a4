"""Rewrite constraints.txt: pin every package pip picks for pyproject's runtime and test requirements
in an empty environment, and stamp the file's hash into cluster/runtime_env.yaml.

    python .ci/lock.py      # from any environment with CPython 3.11 on Linux x86_64 (CI's and the cluster's)
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
RUNTIME_ENV = ROOT / "cluster" / "runtime_env.yaml"
# Ray caches a pip runtime env by the text of its pip list, so the lock's hash goes into that text.
LOCK_LINE = re.compile(r"(-c \$\{RAY_RUNTIME_ENV_CREATE_WORKING_DIR\}/constraints\.txt +# sha256:)[0-9a-f]*")

HEADER = """\
# The exact versions CI tests (.ci/run installs with PIP_CONSTRAINT=constraints.txt) and the cluster
# runtime env installs (cluster/runtime_env.yaml passes `-c` to pip): every package pip picks for
# pyproject.toml's dependencies and its [test] extra in an empty environment.
# Resolved on {python}; a pin a platform does not need (nvidia-*, triton
# on macOS) is inert, since a constraint never installs anything by itself.
# Regenerate after editing pyproject.toml's requirements: python .ci/lock.py
# tests/integration/test_requirements.py fails while this file and pyproject.toml disagree.
"""


def resolve() -> dict[str, str]:
    """pip's resolution of ``.[test]`` as in an empty environment: {name: version}."""
    env = {k: v for k, v in os.environ.items() if k != "PIP_CONSTRAINT"}  # resolve afresh, not from the old lock
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--ignore-installed",
        "--quiet",
        "--report",
        "-",
        "-e",
        ".[test]",
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    project = canonicalize_name("detr-ray")
    pins = {}
    for item in json.loads(done.stdout)["install"]:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        if canonicalize_name(name) != project:
            pins[name] = version
    return pins


def main() -> None:
    pins = resolve()
    python = f"CPython {platform.python_version()} on {platform.system()} {platform.machine()}"
    lines = [f"{name}=={pins[name]}" for name in sorted(pins, key=canonicalize_name)]
    LOCK.write_text(HEADER.format(python=python) + "\n".join(lines) + "\n")
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:16]
    text, count = LOCK_LINE.subn(rf"\g<1>{digest}", RUNTIME_ENV.read_text())
    assert count == 1, (
        f"{RUNTIME_ENV} has no `-c ${{RAY_RUNTIME_ENV_CREATE_WORKING_DIR}}/constraints.txt  # sha256:` line"
    )
    RUNTIME_ENV.write_text(text)
    print(f"{LOCK.name}: {len(lines)} pins ({python}); {RUNTIME_ENV.name}: sha256:{digest}")


if __name__ == "__main__":
    main()
