"""What leaves a checkout for a cluster: `ray job submit --working-dir .` (Ray's own packaging code,
up to its HTTP request) and `ray up`'s file_mounts rsync never carry credentials or local outputs,
whether .rayignore, .gitignore or the runtime env's `excludes` is what applies."""

from __future__ import annotations

import io
import shutil
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_ENV = Path("cluster") / "runtime_env.yaml"

# Files a developer may have lying in a checkout; none may reach a cluster.
CREDENTIALS = [
    ".env",
    ".env.local",
    "jobs/.env",
    ".envrc",
    "key.pem",
    "cluster/tls.key",
    "client.p12",
    ".aws/credentials",
    ".aws/config",
    "id_rsa",
    "id_rsa.pub",
    ".ssh/id_ed25519",
    ".netrc",
    ".git-credentials",
    "x.kubeconfig",
    "cluster/kuberay/admin.kubeconfig",
    ".kube/config",
    "kubeconfig",
    "service-account-prod.json",
    "application_default_credentials.json",
    ".config/gcloud/credentials.db",
    ".docker/config.json",
    ".ray/auth_token",
    "auth_token",
]
LOCAL_OUTPUTS = [
    "detr-ray-output/part-0.parquet",
    "detections.parquet",
    "jobs/weights.pth",
    "final.pt",
    "model.safetensors",
    "epoch=1.ckpt",
    ".benchmarks/Linux-CPython-3.11/0001.json",
    ".pytest_cache/v/cache/lastfailed",
    "jobs/__pycache__/annotate.cpython-311.pyc",
    "detr_ray.egg-info/PKG-INFO",
    "build/lib/detr/model.py",
    "dist/detr_ray-0.1.0.tar.gz",
    ".venv/bin/python",
]
PLANTED = CREDENTIALS + LOCAL_OUTPUTS


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the repository's code, ignore files and cluster/ with every PLANTED file added."""
    copy = tmp_path / "detr-ray"
    for name in ("detr", "jobs", "cluster"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", ".gitignore", ".rayignore"):
        shutil.copy(ROOT / name, copy / name)
    for name in PLANTED:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_text("aws_secret_access_key = planted\n")
    return copy


def code_files(checkout: Path) -> set[str]:
    """What the cluster needs: the packages, the project file and the cluster configs."""
    wanted = [p for d in ("detr", "jobs", "cluster") for p in (checkout / d).rglob("*") if p.is_file()]
    names = {p.relative_to(checkout).as_posix() for p in wanted} - set(PLANTED)
    return names | {"pyproject.toml", "README.md"}


def uploaded_by_ray_job_submit(working_dir: Path, runtime_env_file: Path | None) -> set[str]:
    """The files in the package `ray job submit --working-dir DIR [--runtime-env FILE]` would PUT to
    the cluster, from Ray's own job client: parse_runtime_env_args -> upload_working_dir_if_needed
    (excludes + .gitignore + .rayignore) -> create_package, stopped at the HTTP request."""
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.job_submission import JobSubmissionClient

    runtime_env = parse_runtime_env_args(
        runtime_env=str(runtime_env_file) if runtime_env_file else None, working_dir=str(working_dir)
    )
    client = JobSubmissionClient.__new__(JobSubmissionClient)  # no cluster to connect to
    bodies: list[bytes] = []
    client._package_exists = lambda uri: False
    client._do_request = lambda method, endpoint, *, data=None, **kwargs: (
        bodies.append(data) or SimpleNamespace(status_code=200)
    )
    client._upload_working_dir_if_needed(runtime_env)
    (package,) = bodies
    return {name for name in zipfile.ZipFile(io.BytesIO(package)).namelist() if not name.endswith("/")}


def pattern_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize(
    "scenario",
    [
        "as the README runs it",  # --runtime-env cluster/runtime_env.yaml, .gitignore and .rayignore
        ".rayignore alone",  # no --runtime-env, RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1, Ray's defaults off
        "runtime_env excludes alone",  # a working dir without .rayignore or .gitignore
    ],
)
def test_ray_job_submit_uploads_code_and_nothing_planted(checkout: Path, scenario: str, monkeypatch):
    runtime_env_file = checkout / RUNTIME_ENV
    if scenario != "as the README runs it":
        monkeypatch.setenv("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", "")  # Ray's .git/.venv/... defaults off
    if scenario == ".rayignore alone":
        monkeypatch.setenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "1")
        runtime_env_file = None
    if scenario == "runtime_env excludes alone":
        (checkout / ".rayignore").unlink()
        (checkout / ".gitignore").unlink()

    uploaded = uploaded_by_ray_job_submit(checkout, runtime_env_file)

    leaked = sorted(set(PLANTED) & uploaded)
    assert not leaked, f"{scenario}: `ray job submit --working-dir` would upload {leaked}"
    missing = sorted(code_files(checkout) - uploaded)
    assert not missing, f"{scenario}: the upload lacks {missing}"


def test_runtime_env_excludes_repeat_the_rayignore():
    excludes = yaml.safe_load((ROOT / RUNTIME_ENV).read_text())["excludes"]
    missing = [p for p in pattern_lines(ROOT / ".rayignore") if p not in excludes]
    assert not missing, f"cluster/runtime_env.yaml `excludes` lacks .rayignore's {missing}"


def test_rayignore_is_plain_enough_for_rsync():
    # rsync's dir-merge reads the same file for `ray up`; there "!" clears the list instead of negating.
    assert not [p for p in pattern_lines(ROOT / ".rayignore") if p.startswith("!")]


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed")
def test_ray_up_file_mounts_rsync_skips_planted_files(checkout: Path, tmp_path: Path):
    """The launcher copies "." to every node with rsync and the config's rsync_exclude/rsync_filter,
    turned into flags by Ray's own command runner."""
    from ray.autoscaler._private.command_runner import SSHCommandRunner

    config = yaml.safe_load((ROOT / "cluster" / "launcher-aws.yaml").read_text())
    (mount,) = [remote for remote, local in config["file_mounts"].items() if local == "."]
    options = {"rsync_exclude": config.get("rsync_exclude"), "rsync_filter": config.get("rsync_filter")}
    flags = SSHCommandRunner._create_rsync_filter_args(None, options)  # uses no instance state
    target = tmp_path / "node" / mount.lstrip("/")
    target.mkdir(parents=True)
    subprocess.run(["rsync", "-a", *flags, f"{checkout}/", f"{target}/"], check=True)

    synced = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    leaked = sorted(set(PLANTED) & synced)
    assert not leaked, f"`ray up` would copy {leaked} to every node"
    missing = sorted(code_files(checkout) - synced)
    assert not missing, f"`ray up` would not copy {missing}"
