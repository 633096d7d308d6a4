"""constraints.txt - the versions CI tests and the cluster installs - agrees with pyproject.toml,
and every place that installs the project applies it."""

from __future__ import annotations

import fnmatch
import hashlib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "constraints.txt"
RUNTIME_ENV = ROOT / "cluster" / "runtime_env.yaml"
LAUNCHER = ROOT / "cluster" / "launcher-aws.yaml"
# Ray sets the variable to the uploaded working dir while it builds the env; pip expands it.
RUNTIME_ENV_LOCK = "-c ${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}/constraints.txt"
REGENERATE = "run `python .ci/lock.py` after editing pyproject.toml's requirements"


def _pyproject_requirements() -> list[Requirement]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


def _lock() -> dict[str, Version]:
    """constraints.txt as {canonical name: pinned version}; every line one exact ``==`` pin."""
    pins: dict[str, Version] = {}
    for number, line in enumerate(LOCK.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        pin = Requirement(line)
        specs = list(pin.specifier)
        assert len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version, (
            f"constraints.txt:{number}: {line!r} is not one exact `==` pin"
        )
        assert not pin.extras and not pin.marker and not pin.url, (
            f"constraints.txt:{number}: {line!r} is more than a pin"
        )
        name = canonicalize_name(pin.name)
        assert name not in pins, f"constraints.txt:{number}: {pin.name} is pinned twice"
        pins[name] = Version(specs[0].version)
    return pins


def _lock_line() -> str:
    return f"{RUNTIME_ENV_LOCK}  # sha256:{hashlib.sha256(LOCK.read_bytes()).hexdigest()[:16]}"


def test_lock_is_exact_pins():
    assert len(_lock()) > len(_pyproject_requirements()), "constraints.txt pins fewer packages than pyproject names"


@pytest.mark.parametrize("requirement", _pyproject_requirements(), ids=str)
def test_lock_satisfies_pyproject(requirement: Requirement):
    # The lock is resolved for CPython 3.11 (CI's and the cluster images'): requirements for other Pythons have no pin.
    if requirement.marker and not requirement.marker.evaluate(
        {"python_version": "3.11", "python_full_version": "3.11.7"}
    ):
        pytest.skip(f"{requirement} does not apply to the Python the lock is for")
    pins = _lock()
    name = canonicalize_name(requirement.name)
    assert name in pins, f"constraints.txt has no pin for {requirement}; {REGENERATE}"
    assert requirement.specifier.contains(pins[name], prereleases=True), (
        f"constraints.txt pins {requirement.name}=={pins[name]}, outside pyproject's {requirement}; {REGENERATE}"
    )


def test_lock_has_pyprojects_ray():
    (ray,) = [r for r in _pyproject_requirements() if r.name == "ray"]
    (spec,) = ray.specifier
    assert _lock()["ray"] == Version(spec.version), (
        "the cluster images' Ray (= pyproject's pin) must be the Ray CI tested"
    )


def test_boto3_range_is_aiobotocores_botocore_range():
    """aiobotocore (under s3fs) allows a few botocore releases; outside them pip tries every boto3,
    aiobotocore and s3fs release to find a matching pair (minutes of backtracking, issue 17)."""
    try:
        installed = Version(metadata.version("aiobotocore"))
    except metadata.PackageNotFoundError:
        pytest.skip("aiobotocore is not installed")
    if installed != _lock()["aiobotocore"]:
        pytest.skip(f"aiobotocore {installed} is installed, constraints.txt pins {_lock()['aiobotocore']}")
    (botocore,) = [
        r for r in map(Requirement, metadata.requires("aiobotocore")) if r.name == "botocore" and not r.marker
    ]
    (boto3,) = [r for r in _pyproject_requirements() if r.name == "boto3"]
    assert boto3.specifier == botocore.specifier, (
        f"pyproject's {boto3} must be aiobotocore {installed}'s botocore range `{botocore.specifier}`; {REGENERATE}"
    )


def test_runtime_env_applies_the_lock():
    runtime_env = yaml.safe_load(RUNTIME_ENV.read_text())
    options = [p for p in runtime_env["pip"]["packages"] if p.startswith("-")]
    assert options == [_lock_line()], (
        f"runtime_env.yaml's pip list needs exactly {_lock_line()!r} (a stale hash keeps old envs on a cluster); "
        f"{REGENERATE}"
    )
    # the lock must be uploaded with the working dir: Ray skips `excludes` and .gitignore'd files
    patterns = runtime_env.get("excludes", []) + (ROOT / ".gitignore").read_text().splitlines()
    assert not [p for p in patterns if fnmatch.fnmatch(LOCK.name, p.strip().lstrip("/"))], (
        "constraints.txt would not be uploaded"
    )


def test_ci_and_launcher_install_with_the_lock():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "PIP_CONSTRAINT=" in ci and LOCK.name in ci, ".ci/run must install with constraints.txt"
    launcher = yaml.safe_load(LAUNCHER.read_text())
    (checkout,) = [remote for remote, local in launcher["file_mounts"].items() if local == "."]
    assert any(f"-c {checkout}/{LOCK.name} " in command for command in launcher["setup_commands"]), (
        f"launcher-aws.yaml's setup_commands must pip install with -c {checkout}/{LOCK.name}"
    )
