"""cluster/: every manifest parses and agrees with the jobs' real argument parsers, pyproject's
Ray pin and dependencies, the GPU layout each job asks for, and Ray's own config validators; Ray's
token authentication stays on, pods reach the object store by workload identity, and no cluster file
or README carries a credential."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser from PyPI (the test extra installs it there)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
LAUNCHER = CLUSTER / "launcher-aws.yaml"
JOBS_WITH_RAYJOBS = ("jobs.annotate", "jobs.finetune", "jobs.score")
RAY_IMAGE = re.compile(r"^rayproject/ray:(?P<version>\d+\.\d+\.\d+)-(?P<python>py3\d+)(?:-(?P<platform>\w+))?$")
# Schemes of object stores every pod can reach; a local path on a pod is a pod-local folder.
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "az://", "abfs://", "hf://")
GPU = "nvidia.com/gpu"
OBJECT_STORE_SECRET = "detr-ray-object-store"  # the documented fallback to workload identity
# The Secret fallback, one commented line per Ray container that reads or writes the store.
SECRET_FALLBACK = re.compile(r"^(\s*)# (envFrom: \[\{secretRef: \{name: detr-ray-object-store\}\}\])", re.MULTILINE)
# Credentials that must never sit in a committed file: presigned URLs (S3, GCS, Azure SAS),
# passwords in URLs, AWS key ids, private keys, GitHub tokens.
SECRET_PATTERN = re.compile(
    r"(?i:X-Amz-(?:Credential|Signature|Security-Token)=)"
    r"|(?i:X-Goog-(?:Credential|Signature)=)"
    r"|AWSAccessKeyId=[^&\s]+|[?&]Signature=[^&\s]+"
    r"|[?&]sig=[A-Za-z0-9%+/=]{10,}"
    r"|[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@"
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----"
    r"|\bgh[pousr]_[A-Za-z0-9]{36}\b"
)


def _load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _dependencies() -> list[Requirement]:
    return [Requirement(line) for line in _pyproject()["project"]["dependencies"]]


def _ray_pin() -> str:
    (ray,) = [r for r in _dependencies() if r.name == "ray"]
    (spec,) = ray.specifier
    assert spec.operator == "==", f"pyproject pins ray with {spec}; the cluster images need one exact version"
    return spec.version


def _rayjob_paths() -> list[Path]:
    return sorted(p for p in KUBERAY.glob("*.yaml") if _load(p)["kind"] == "RayJob")


RAYJOBS = _rayjob_paths()
RAY_MANIFESTS = sorted(p for p in KUBERAY.glob("*.yaml") if _load(p)["kind"] in ("RayJob", "RayCluster"))
SERVICE_ACCOUNT = _load(KUBERAY / "serviceaccount.yaml")["metadata"]["name"]


# --- the jobs' argument parsers -------------------------------------------------------------


def job_parser(module: ModuleType) -> argparse.ArgumentParser:
    """The job's ArgumentParser."""
    return module.build_parser()


def parse_entrypoint(command: str) -> tuple[ModuleType, list[str], argparse.Namespace]:
    """``python -m jobs.X ARGS`` -> (the jobs module, ARGS, ARGS parsed by the job itself);
    fails with argparse's own message on an unknown flag, a bad value or a wrong positional count."""
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-m"] and len(argv) > 2, f"entrypoint must be `python -m jobs.<job> ...`: {command!r}"
    name = argv[2]
    assert name.startswith("jobs.") and (ROOT / "jobs" / name.removeprefix("jobs.") / "__main__.py").is_file(), (
        f"entrypoint runs {name}, which is no job package in jobs/"
    )
    module = importlib.import_module(name)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            args = module.build_parser().parse_args(argv[3:])
        except SystemExit:
            pytest.fail(f"{name} rejects the entrypoint's arguments {argv[3:]}:\n{stderr.getvalue()}")
    return module, argv[3:], args


def check_flags_exact(module: ModuleType, argv: list[str], args: argparse.Namespace) -> None:
    """Every flag is spelled out (argparse would accept a prefix) and every positional is given."""
    parser = job_parser(module)
    options = parser._option_string_actions
    for token in argv:
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
            assert flag in options, f"{module.__name__}: {flag} is no flag of its parser (abbreviated or removed?)"
    for action in parser._actions:
        if not action.option_strings and action.dest != argparse.SUPPRESS:
            value = getattr(args, action.dest)
            given = value if isinstance(value, list) else [value]
            assert all(str(v) in argv for v in given), (
                f"{module.__name__}: positional {action.dest.upper()} is not given, it would default to {value!r}"
            )


def check_remote_uris(argv: list[str]) -> None:
    """Inputs and outputs are object-store URIs (a path on a pod is that pod's private disk), and
    no argument carries a credential."""
    for token in argv:
        assert not re.search(r"secret|password|access[_-]?key|token", token, re.IGNORECASE), (
            f"argument {token!r} looks like a credential; credentials come from the Secret via env"
        )
        if "/" in token and not token.startswith("-"):
            assert token.startswith(REMOTE_SCHEMES), f"{token!r} is not an object-store URI"
            assert "@" not in token.split("/")[2], f"{token!r} embeds credentials"


# --- Kubernetes pod templates ----------------------------------------------------------------


def _quantity(value: str | float) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _ray_container(group: dict) -> dict:
    return _containers(group)[0]  # KubeRay runs Ray in the first container


def group_resources(group: dict) -> dict[str, float]:
    """Ray's resources for one pod of a group: rayStartParams override the container limits, as in KubeRay."""
    limits = _ray_container(group).get("resources", {}).get("limits", {})
    params = group.get("rayStartParams") or {}
    return {
        "CPU": float(params["num-cpus"]) if "num-cpus" in params else _quantity(limits.get("cpu", 0)),
        "GPU": float(params["num-gpus"]) if "num-gpus" in params else _quantity(limits.get(GPU, 0)),
    }


def cluster_nodes(spec: dict, replicas_key: str) -> list[dict]:
    """``ray.nodes()``-shaped entries for the head and ``replicas_key`` pods of each worker group."""
    nodes = [{"Alive": True, "Resources": group_resources(spec["headGroupSpec"])}]
    for group in spec.get("workerGroupSpecs") or []:
        nodes += [{"Alive": True, "Resources": group_resources(group)}] * int(group.get(replicas_key, 0))
    return nodes


def total_gpus(nodes: list[dict]) -> float:
    return sum(node["Resources"]["GPU"] for node in nodes)


def check_cluster_spec(spec: dict, where: str) -> None:
    """Ray version = pyproject's pin everywhere, one Python across pods, GPU limits = requests,
    every Ray pod runs as the workload-identity service account (credentials, if any, only from
    the object-store Secret), a Kubernetes API token only where the autoscaler needs it, and no
    Ray Client port."""
    pin = _ray_pin()
    assert str(spec["rayVersion"]) == pin, f"{where}: rayVersion {spec['rayVersion']} != pyproject's ray=={pin}"
    groups = [spec["headGroupSpec"], *(spec.get("workerGroupSpecs") or [])]
    pythons = set()
    for group in groups:
        container = _ray_container(group)
        match = RAY_IMAGE.match(container["image"])
        assert match, f"{where}: image {container['image']} is not a rayproject/ray:<version>-py3X[-platform] tag"
        assert match["version"] == pin, f"{where}: image {container['image']} is not Ray {pin}"
        pythons.add(match["python"])
        resources = container.get("resources", {})
        if GPU in resources.get("limits", {}):
            assert match["platform"] in ("gpu",) or str(match["platform"]).startswith("cu"), (
                f"{where}: a GPU pod runs the CPU image {container['image']}"
            )
            assert resources.get("requests", {}).get(GPU, resources["limits"][GPU]) == resources["limits"][GPU]
        pod = group["template"]["spec"]
        assert pod.get("serviceAccountName") == SERVICE_ACCOUNT, (
            f"{where}: {container['name']} pods do not run as {SERVICE_ACCOUNT}, so they get no object-store identity"
        )
        autoscaler = group is spec["headGroupSpec"] and spec.get("enableInTreeAutoscaling") is True
        assert pod.get("automountServiceAccountToken") is autoscaler, (
            f"{where}: {container['name']} pods need a Kubernetes API token only for the in-tree autoscaler"
        )
        secrets = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e] + [
            e["valueFrom"]["secretKeyRef"]["name"]
            for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})
        ]
        assert set(secrets) <= {OBJECT_STORE_SECRET}, f"{where}: {container['name']} loads Secrets {secrets}"
        client_ports = [
            p for p in container.get("ports", []) if p.get("name") == "client" or p["containerPort"] == 10001
        ]
        assert not client_ports, f"{where}: nothing here uses Ray Client; do not expose port 10001"
        for env in container.get("env", []):
            assert not (re.search(r"KEY|SECRET|TOKEN|PASSWORD", env["name"]) and "value" in env), (
                f"{where}: {env['name']} is written into the manifest; use a Secret"
            )
    assert len(pythons) == 1, f"{where}: head and workers run different Pythons {pythons}; Ray needs one"
    for group in spec.get("workerGroupSpecs") or []:
        assert 0 <= group.get("minReplicas", 0) <= group.get("replicas", 0) <= group["maxReplicas"], (
            f"{where}: worker group {group['groupName']} needs minReplicas <= replicas <= maxReplicas"
        )


def check_token_auth(manifest: dict) -> None:
    """Ray's token authentication is on (KubeRay >= 1.5 generates the token and gives it to every
    Ray container and the submitter) and no container turns it off again."""
    name = f"{manifest['kind']} {manifest['metadata']['name']}"
    spec = manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]
    mode = (spec.get("authOptions") or {}).get("mode")
    assert mode == "token", (
        f"{name}: authOptions.mode is {mode!r}; its dashboard would run jobs for anyone who reaches it"
    )
    for group in [spec["headGroupSpec"], *(spec.get("workerGroupSpecs") or [])]:
        for container in _containers(group):
            for env in container.get("env", []):
                assert env["name"] != "RAY_AUTH_MODE" or env.get("value") == "token", (
                    f"{name}: {container['name']} turns token auth off ({env})"
                )


def check_pinned_by_hash(packages: list[str], where: str) -> None:
    """pip installs a URL requirement only if its bytes match the ``#sha256=`` it carries."""
    for requirement in map(Requirement, packages):
        if requirement.url and requirement.url.startswith("https://"):
            assert re.search(r"#sha256=[0-9a-f]{64}$", requirement.url), (
                f"{where}: {requirement.name} @ {requirement.url} is not pinned with #sha256=<64 hex digits>"
            )


def check_runtime_env_installs_project(runtime_env: dict, where: str) -> None:
    """The runtime env installs this project (a ``detr-ray @ URL`` requirement) or every runtime
    dependency pyproject names, with pyproject's version bounds."""
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**runtime_env)  # Ray's own validation of pip/env_vars/working_dir fields
    pip = runtime_env.get("pip")
    packages = pip["packages"] if isinstance(pip, dict) else pip
    assert packages, f"{where}: no pip packages; the cluster images do not have this project's dependencies"
    # pip option lines (runtime_env.yaml's `-c constraints.txt`) are checked in tests/integration/test_requirements.py
    lines = [p for p in packages if not p.startswith("-")]
    check_pinned_by_hash(lines, where)
    requirements = {canonicalize_name(r.name): r for r in map(Requirement, lines)}
    project = canonicalize_name(_pyproject()["project"]["name"])
    if project in requirements:
        assert requirements[project].url, f"{where}: {project} must be installed from its source URL (not on PyPI)"
        return
    for dependency in _dependencies():
        name = canonicalize_name(dependency.name)
        assert name in requirements, f"{where}: pip misses {dependency}, a runtime dependency in pyproject.toml"
        listed = requirements[name]
        assert listed.specifier == dependency.specifier and listed.extras >= dependency.extras, (
            f"{where}: pip has {listed}, pyproject.toml has {dependency}"
        )
    assert set(requirements) <= {canonicalize_name(d.name) for d in _dependencies()}, (
        f"{where}: pip lists packages pyproject.toml does not: {sorted(requirements)}"
    )


# --- GPU demand of each job, computed with the jobs' own planning code ----------------------


def annotate_gpus(args: argparse.Namespace, start: list[dict], most: list[dict]) -> None:
    from jobs.annotate import config_from_args
    from jobs.annotate.actor_plan import plan_actors

    plan = plan_actors(config_from_args(args), start)  # raises ActorPlanError where the job would refuse to start
    assert plan.gpus_per_actor > 0, "the annotate RayJob runs its model on CPU although it has GPU workers"
    needed = plan.max_actors * plan.gpus_per_actor
    assert needed <= total_gpus(most), (
        f"--actors up to {plan.max_actors} need {needed:g} GPUs, maxReplicas give {total_gpus(most):g}"
    )


def finetune_gpus(args: argparse.Namespace, start: list[dict], most: list[dict]) -> None:
    needed = args.workers * args.gpus_per_worker
    assert needed > 0, "the finetune RayJob trains on CPU although it has GPU workers"
    # DDP needs every worker at once: the cluster as started must hold them all.
    assert needed <= total_gpus(start), (
        f"{args.workers} workers x {args.gpus_per_worker:g} GPUs > {total_gpus(start):g} GPUs at start"
    )
    gpu_nodes = [node["Resources"] for node in start if node["Resources"]["GPU"] > 0]
    assert args.gpus_per_worker <= max(n["GPU"] for n in gpu_nodes), (
        f"--gpus-per-worker {args.gpus_per_worker:g} exceeds a node's GPUs"
    )
    assert args.cpus_per_worker <= min(n["CPU"] for n in gpu_nodes), (
        f"--cpus-per-worker {args.cpus_per_worker:g} exceeds a GPU node's CPUs"
    )


def score_gpus(args: argparse.Namespace, start: list[dict], most: list[dict]) -> None:
    assert total_gpus(most) == 0, "jobs.score runs on one CPU core; its cluster should not hold GPUs"


GPU_CHECKS: dict[str, Callable[[argparse.Namespace, list[dict], list[dict]], None]] = {
    "jobs.annotate": annotate_gpus,
    "jobs.finetune": finetune_gpus,
    "jobs.score": score_gpus,
}


# --- tests -----------------------------------------------------------------------------------


def test_every_job_has_a_rayjob():
    modules = {shlex.split(_load(p)["spec"]["entrypoint"])[2] for p in RAYJOBS}
    assert set(JOBS_WITH_RAYJOBS) <= modules, f"RayJob manifests missing for {set(JOBS_WITH_RAYJOBS) - modules}"


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_entrypoint_matches_the_job_parser(path: Path):
    module, argv, args = parse_entrypoint(_load(path)["spec"]["entrypoint"])
    check_flags_exact(module, argv, args)
    check_remote_uris(argv)


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_cluster(path: Path):
    manifest = _load(path)
    assert manifest["apiVersion"] == "ray.io/v1"
    spec = manifest["spec"]
    assert spec.get("shutdownAfterJobFinishes") is True, f"{path.name}: the cluster would outlive its job"
    assert isinstance(spec.get("backoffLimit"), int) and 0 <= spec["backoffLimit"] <= 3, (
        f"{path.name}: set backoffLimit (0-3); every retry starts a whole new cluster"
    )
    assert "submitterPodTemplate" not in spec, f"{path.name}: KubeRay's default submitter needs no store access"
    check_cluster_spec(spec["rayClusterSpec"], path.name)
    check_runtime_env_installs_project(yaml.safe_load(spec["runtimeEnvYAML"]), path.name)


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_gpus_fit_the_job(path: Path):
    spec = _load(path)["spec"]
    module, _, args = parse_entrypoint(spec["entrypoint"])
    assert module.__name__ in GPU_CHECKS, f"{path.name}: add {module.__name__}'s GPU demand to GPU_CHECKS"
    cluster = spec["rayClusterSpec"]
    start = cluster_nodes(cluster, "replicas")
    most = cluster_nodes(cluster, "maxReplicas")
    if module.__name__ != "jobs.score":
        gpu_groups = [g for g in cluster["workerGroupSpecs"] if GPU in _ray_container(g)["resources"]["limits"]]
        assert gpu_groups, f"{path.name}: no worker group with {GPU} limits"
    GPU_CHECKS[module.__name__](args, start, most)


def test_raycluster_for_interactive_jobs():
    manifest = _load(KUBERAY / "raycluster.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayCluster")
    spec = manifest["spec"]
    check_cluster_spec(spec, "raycluster.yaml")
    assert total_gpus(cluster_nodes(spec, "maxReplicas")) >= 1, "raycluster.yaml has no GPU worker group"
    assert total_gpus(cluster_nodes(spec, "replicas")) >= 1, "jobs.annotate needs a GPU up when it starts"


def test_runtime_env_file():
    runtime_env = _load(RUNTIME_ENV)
    check_runtime_env_installs_project(runtime_env, RUNTIME_ENV.name)
    assert ".git" in runtime_env["excludes"]
    assert "working_dir" not in runtime_env, "the working dir comes from `ray job submit --working-dir .`"
    for name, value in runtime_env.get("env_vars", {}).items():
        assert isinstance(value, str), f"env var {name}: Ray needs string values, got {value!r}"
        assert not re.search(r"KEY|SECRET|TOKEN|PASSWORD", name), f"{name} does not belong in a committed file"


def test_launcher_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(LAUNCHER)
    prepared = prepare_config(config)
    validate_config(prepared)  # Ray's JSON schema for `ray up`
    match = RAY_IMAGE.match(config["docker"]["image"])
    assert match and match["version"] == _ray_pin(), f"{config['docker']['image']} is not Ray {_ray_pin()}"
    assert match["platform"] == "gpu" or str(match["platform"]).startswith("cu")
    workers = {
        name: node for name, node in prepared["available_node_types"].items() if name != prepared["head_node_type"]
    }
    gpu_workers = [
        n for n in workers.values() if re.match(r"(g4dn|g5|g6e?|p3|p4de?|p5e?)\.", n["node_config"]["InstanceType"])
    ]
    assert gpu_workers, "no GPU instance type among the worker node types"
    for node in gpu_workers:
        assert 1 <= node["min_workers"] <= node["max_workers"] <= prepared["max_workers"], (
            "GPU workers need 1 <= min_workers <= max_workers <= max_workers (jobs.annotate needs a GPU at start)"
        )
    # setup installs the project from the checkout that file_mounts copies to every node
    (checkout,) = [remote for remote, local in config["file_mounts"].items() if local == "."]
    assert any(re.search(rf"pip install .*{re.escape(checkout)}(\s|$)", c) for c in prepared["setup_commands"])
    check_launcher_token_auth(config)


def check_launcher_token_auth(config: dict) -> None:
    """Head and workers start Ray with token auth, and every node gets the token file."""
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), (
            f"{key}: `ray start` without RAY_AUTH_MODE=token"
        )
    assert "~/.ray/auth_token" in config["file_mounts"].values(), (
        "file_mounts must copy ~/.ray/auth_token to every node"
    )


@pytest.mark.parametrize("path", RAY_MANIFESTS, ids=lambda p: p.name)
def test_token_auth_is_on_in_every_kuberay_manifest(path: Path):
    check_token_auth(_load(path))


def _drop_auth_options(spec: dict) -> None:
    del spec["authOptions"]


def _disable_auth(spec: dict) -> None:
    spec["authOptions"]["mode"] = "disabled"


def _env_disables_auth(spec: dict) -> None:
    _ray_container(spec["headGroupSpec"]).setdefault("env", []).append({"name": "RAY_AUTH_MODE", "value": "disabled"})


@pytest.mark.parametrize("path", RAY_MANIFESTS, ids=lambda p: p.name)
@pytest.mark.parametrize(
    "tamper", [_drop_auth_options, _disable_auth, _env_disables_auth], ids=lambda f: f.__name__[1:]
)
def test_token_auth_check_fails_on_a_manifest_without_it(path: Path, tamper: Callable[[dict], None]):
    manifest = _load(path)
    tamper(manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"])
    with pytest.raises(AssertionError, match="auth"):
        check_token_auth(manifest)


def test_launcher_token_auth_check_fails_without_it():
    config = _load(LAUNCHER)
    config["worker_start_ray_commands"] = [
        c.replace("RAY_AUTH_MODE=token ", "") for c in config["worker_start_ray_commands"]
    ]
    with pytest.raises(AssertionError, match="RAY_AUTH_MODE=token"):
        check_launcher_token_auth(config)


def test_service_account_for_workload_identity():
    manifest = _load(KUBERAY / "serviceaccount.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("v1", "ServiceAccount")
    assert manifest.get("automountServiceAccountToken") is False, "pods that need an API token ask for it themselves"
    text = (KUBERAY / "serviceaccount.yaml").read_text()
    for annotation in ("eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account"):
        assert annotation in text, f"serviceaccount.yaml does not show how to set {annotation}"


@pytest.mark.parametrize("path", RAY_MANIFESTS, ids=lambda p: p.name)
def test_secret_fallback_uncommented_gives_the_secret_to_the_ray_containers(path: Path):
    """The documented fallback: uncomment the envFrom lines and every Ray container that touches the
    store (all of them here; not the submitter or the autoscaler sidecar) loads the Secret."""
    text = path.read_text()
    manifest = yaml.safe_load(SECRET_FALLBACK.sub(r"\1\2", text))
    spec = manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]
    groups = [spec["headGroupSpec"], *(spec.get("workerGroupSpecs") or [])]
    assert len(SECRET_FALLBACK.findall(text)) == len(groups), f"{path.name}: one fallback line per Ray container"
    for group in groups:
        assert _ray_container(group)["envFrom"] == [{"secretRef": {"name": OBJECT_STORE_SECRET}}]
    check_cluster_spec(spec, f"{path.name} with the Secret fallback")


def _committed_text_files() -> list[Path]:
    return [p for p in CLUSTER.rglob("*") if p.is_file()] + [ROOT / "README.md", ROOT / ".rayignore"]


@pytest.mark.parametrize("path", _committed_text_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_credentials_in_cluster_files_or_readme(path: Path):
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = SECRET_PATTERN.search(line)
        assert not match, f"{path.relative_to(ROOT)}:{number} carries a credential ({match.group(0)!r})"


@pytest.mark.parametrize(
    "line",
    [
        "s3://b/k.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20240101&X-Amz-Signature=abc",
        "https://b.s3.amazonaws.com/k?x-amz-signature=0123abcd&X-Amz-Date=20240101T000000Z",
        "https://storage.googleapis.com/b/k?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=sa%40p.iam",
        "https://storage.googleapis.com/b/k?X-Goog-Signature=5f1e",
        "https://b.s3.amazonaws.com/k?AWSAccessKeyId=AKIDEXAMPLE&Expires=1700000000&Signature=vjbyPxybd",
        "https://acct.blob.core.windows.net/c/k?sv=2022-11-02&se=2024-01-01&sr=b&sp=r&sig=AbCdEf0123%2B%3D",
        "AWS_ENDPOINT_URL: https://minio:minio123@minio.example:9000",
        "aws_access_key_id = AKIAIOSFODNN7EXAMPLE",
        "-----BEGIN OPENSSH PRIVATE KEY-----",
        "pip install git+https://ghp_0123456789abcdefghijABCDEFGHIJ012345@github.com/o/r",
    ],
)
def test_secret_pattern_catches_planted_credentials(line: str):
    assert SECRET_PATTERN.search(line), line


@pytest.mark.parametrize(
    "line",
    [
        "python -m jobs.annotate s3://YOUR-BUCKET/images s3://YOUR-BUCKET/detections",
        "- detr-ray @ https://github.com/YOUR-ORG/detr-ray/archive/refs/tags/v0.1.0.zip#sha256=" + "0" * 64,
        "kubectl create secret generic detr-ray-object-store --from-literal=AWS_ACCESS_KEY_ID=...",
        'export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(kubectl get secret x -o jsonpath="{.data.auth_token}")',
        "ray job submit --address http://localhost:8265 --working-dir .",
        '"Resource": "arn:aws:iam::YOUR-ACCOUNT-ID:role/detr-ray-worker"',
        "git clone git+ssh://git@github.com/YOUR-ORG/detr-ray",
    ],
)
def test_secret_pattern_passes_the_placeholders_the_docs_use(line: str):
    assert not SECRET_PATTERN.search(line), line
