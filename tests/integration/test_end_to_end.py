"""End to end through `ray job submit`, the way a user runs the jobs on a cluster.

A real Ray head (``ray start --head`` with its dashboard, token auth on, loopback only) and
moto's S3 server; a synthetic COCO dataset in the bucket; then three jobs submitted with the
documented command line - ``ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml
-- python -m jobs.<job> ...`` - so the code reaches the cluster only through the uploaded
working dir and the dependencies through the runtime env file:

1. ``jobs.finetune``: a tiny DETR from scratch, one epoch, two Ray Train workers on CPU;
2. ``jobs.annotate``: the weights it wrote, reading images from and writing Parquet to the bucket;
3. ``jobs.score``: that Parquet against the ground truth, metrics JSON to the bucket.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_ENV = ROOT / "cluster" / "runtime_env.yaml"
BIN = Path(sys.executable).parent  # the environment the project is installed in
HEAD_START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 300
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
NUM_IMAGES = 8

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all sockets held open until every port is chosen)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _free_port_range(size: int) -> tuple[int, int]:
    """A run of ``size`` free ports for Ray's workers, outside Ray's default worker range
    (10002-19999, used by any other local cluster) and below the kernel's ephemeral range."""
    rng = secrets.SystemRandom()
    for _ in range(50):
        low = rng.randrange(20000, 32000 - size)
        try:
            held = []
            for port in range(low, low + size):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return low, low + size - 1
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no run of {size} free ports between 20000 and 32000")


def _session_members(session_id: int) -> list[int]:
    """PIDs of the processes in a session (the head's ``start_new_session`` put all of Ray's there)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session ...
            if int(fields[3]) == session_id and fields[0] != "Z":  # zombies are gone already
                members.append(int(entry.name))
    return members


@dataclass
class RayHead:
    """A local Ray head started by ``ray start --head --block`` in its own session."""

    dashboard: str
    token: str
    env: dict[str, str]
    temp_dir: Path
    process: subprocess.Popen
    log_path: Path

    @property
    def client(self) -> JobSubmissionClient:
        from ray.job_submission import JobSubmissionClient

        # An explicit header: the pytest process may have imported Ray before RAY_AUTH_MODE was set.
        return JobSubmissionClient(self.dashboard, headers={"Authorization": f"Bearer {self.token}"})

    def submit(self, *entrypoint: str) -> str:
        """``ray job submit --no-wait`` from the repository root, as cluster/README.md says; returns the id."""
        job = entrypoint[2].rsplit(".", 1)[-1] if entrypoint[1:2] == ("-m",) else "command"
        job_id = f"e2e-{job}-{uuid.uuid4().hex[:6]}"
        command = [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            self.dashboard,
            "--submission-id",
            job_id,
            "--no-wait",
            "--working-dir",
            ".",
            "--runtime-env",
            str(RUNTIME_ENV.relative_to(ROOT)),
            "--",
            *entrypoint,
        ]
        done = subprocess.run(command, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=180, check=False)
        assert done.returncode == 0, f"ray job submit failed:\n{done.stdout}\n{done.stderr}"
        return job_id

    def wait(self, job_id: str, timeout_s: float = JOB_TIMEOUT_S) -> str:
        client = self.client
        deadline = time.monotonic() + timeout_s
        status = str(client.get_job_status(job_id))
        while status not in TERMINAL and time.monotonic() < deadline:
            time.sleep(2)
            status = str(client.get_job_status(job_id))
        return status

    def run(self, *entrypoint: str) -> str:
        """Submit, wait, and fail with the job's logs unless it SUCCEEDED; returns the logs."""
        job_id = self.submit(*entrypoint)
        status = self.wait(job_id)
        logs = self.client.get_job_logs(job_id)
        if status not in TERMINAL:
            self.client.stop_job(job_id)
        assert status == "SUCCEEDED", (
            f"{' '.join(entrypoint)}\nended {status} (waited up to {JOB_TIMEOUT_S} s); job logs:\n{logs[-12000:]}"
        )
        return logs

    def stop(self) -> None:
        """Stop running jobs, then the head (SIGTERM: ``ray start --block`` shuts its node down),
        then anything of its session still alive; only processes this fixture started are touched."""
        try:
            client = self.client
            running = [job for job in client.list_jobs() if str(job.status) not in TERMINAL]
            for job in running:
                client.stop_job(job.submission_id)
            deadline = time.monotonic() + 30
            while running and time.monotonic() < deadline:
                time.sleep(1)
                running = [job for job in running if str(client.get_job_status(job.submission_id)) not in TERMINAL]
        except (OSError, RuntimeError):  # the dashboard may already be gone; the signals below still clean up
            pass
        session = self.process.pid
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                # Its graceful shutdown can wait ~30 s on a process it cannot reap; that buys nothing
                # for a throw-away cluster, so what is left after 10 s gets SIGKILL below.
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for pid in _session_members(session):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process.poll() is None:
            self.process.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_ray_head(extra_env: dict[str, str]) -> RayHead:
    # Short: Ray's unix sockets live under the temp dir and paths are limited to ~107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="re2e", dir="/tmp"))
    token = secrets.token_hex(32)
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.pop("PYTHONPATH", None)  # the jobs must get the code from --working-dir, not from this checkout
    env.update(extra_env)
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    gcs, dashboard, client, node_manager, object_manager, agent, agent_grpc, runtime_env_agent, metrics = _free_ports(9)
    low, high = _free_port_range(200)
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(gcs),
        "--include-dashboard",
        "true",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--ray-client-server-port",
        str(client),
        "--node-manager-port",
        str(node_manager),
        "--object-manager-port",
        str(object_manager),
        "--dashboard-agent-listen-port",
        str(agent),
        "--dashboard-agent-grpc-port",
        str(agent_grpc),
        "--runtime-env-agent-port",
        str(runtime_env_agent),
        "--metrics-export-port",
        str(metrics),
        "--min-worker-port",
        str(low),
        "--max-worker-port",
        str(high),
        "--num-cpus",
        "4",  # logical CPUs: two train workers plus read/decode tasks on this small machine
        "--object-store-memory",
        str(512 * 1024**2),
        "--temp-dir",
        str(temp_dir),
        "--disable-usage-stats",
    ]
    log_path = temp_dir / "ray-start.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(f"http://127.0.0.1:{dashboard}", token, env, temp_dir, process, log_path)
    try:
        _wait_for_dashboard(head)
    except BaseException:  # a head that never served a job is stopped before the error propagates
        head.stop()
        raise
    return head


def _wait_for_dashboard(head: RayHead) -> None:
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while True:
        try:
            head.client.get_version()  # connects, checks the version and the token
            return
        except (OSError, RuntimeError) as error:  # not up yet: connection refused, or dashboard modules loading
            if head.process.poll() is not None or time.monotonic() > deadline:
                output = head.log_path.read_text()[-6000:]
                raise RuntimeError(f"Ray head did not come up ({error}):\n{output}") from None
            time.sleep(1)


@pytest.fixture
def ray_head(s3_server: str) -> Iterator[RayHead]:
    """The S3 settings s3_server put in os.environ reach the head, hence every job and worker."""
    head = start_ray_head({"AWS_ENDPOINT_URL": s3_server})
    try:
        yield head
    finally:
        head.stop()


def _read_parquet_rows(bucket: str, prefix: str) -> list[dict]:
    import boto3
    import pyarrow as pa
    import pyarrow.parquet as pq

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    tables = [
        pq.read_table(pa.BufferReader(s3.get_object(Bucket=bucket, Key=key)["Body"].read()))
        for key in keys
        if key.endswith(".parquet") and not key[len(prefix) :].startswith("_")  # the job's _index/ is not data
    ]
    assert tables, f"no Parquet files under s3://{bucket}/{prefix}: {keys}"
    return pa.concat_tables(tables).to_pylist()


def test_finetune_annotate_score_through_ray_job_submit(ray_head: RayHead, s3_bucket: str):
    import boto3

    data = f"s3://{s3_bucket}/shapes"
    run = f"s3://{s3_bucket}/runs/tiny"
    detections = f"s3://{s3_bucket}/detections"
    metrics = f"s3://{s3_bucket}/metrics/shapes.json"
    # The dataset is made on "the laptop" and lands in the bucket, as a user's would.
    made = subprocess.run(
        [sys.executable, "-m", "jobs.synthetic_shapes", data, "--images", str(NUM_IMAGES), "--seed", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert made.returncode == 0, made.stderr

    ray_head.run(
        "python",
        "-m",
        "jobs.finetune",
        "--train-images",
        f"{data}/images",
        "--train-annotations",
        f"{data}/annotations.json",
        "--output",
        run,
        "--weights",
        "scratch",
        "--backbone",
        "resnet18",
        "--hidden-dim",
        "64",
        "--num-heads",
        "4",
        "--enc-layers",
        "1",
        "--dec-layers",
        "1",
        "--ffn-dim",
        "128",
        "--num-queries",
        "20",
        "--workers",
        "2",
        "--cpus-per-worker",
        "1",
        "--gpus-per-worker",
        "0",
        "--loader-workers",
        "0",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--min-size",
        "128",
        "--max-size",
        "128",
    )
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    s3.head_object(Bucket=s3_bucket, Key="runs/tiny/final.pth")  # raises if finetune wrote no final weights

    ray_head.run(
        "python",
        "-m",
        "jobs.annotate",
        f"{data}/images",
        detections,
        "--weights",
        f"{run}/final.pth",
        "--threshold",
        "0.0",
        "--batch-size",
        "4",
        "--actors",
        "1",
        "--cpus-per-actor",
        "1",
        "--precision",
        "fp32",
        "--min-size",
        "128",
        "--max-size",
        "128",
    )
    rows = _read_parquet_rows(s3_bucket, "detections/")
    expected = {f"{data}/images/{i:06d}.png" for i in range(1, NUM_IMAGES + 1)}
    assert sorted(row["uri"] for row in rows) == sorted(expected), "every image must be annotated exactly once"
    assert all(row["error"] is None for row in rows), [row["error"] for row in rows if row["error"]]
    coco = json.loads(s3.get_object(Bucket=s3_bucket, Key="shapes/annotations.json")["Body"].read())
    labels = {d["label"] for row in rows for d in row["detections"]}
    assert labels and labels <= {c["name"] for c in coco["categories"]}, f"not the fine-tuned classes: {labels}"

    ray_head.run("python", "-m", "jobs.score", detections, f"{data}/annotations.json", "--output", metrics)
    report = json.loads(s3.get_object(Bucket=s3_bucket, Key="metrics/shapes.json")["Body"].read())
    ap = report["stats"]["AP"]
    assert isinstance(ap, float) and 0.0 <= ap <= 1.0, f"AP {ap!r} is not a score"
    assert report["counts"]["images_scored"] == NUM_IMAGES
