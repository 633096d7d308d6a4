"""Shared fixtures: real S3-compatible server (moto, loopback), a local Ray cluster, random checkpoints."""

from __future__ import annotations

import os
import socket
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
COCO_MINI = SHARED_DATA / "coco-mini"
sys.path.insert(0, str(Path(__file__).parent))  # tests/checkpoints.py
KILL_DECODER_NAME = "kill-decoder-test-hook"  # see the ray_cluster fixture


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    """The real COCO subset in ../shared/data; tests using it skip when it is absent."""
    if not (COCO_MINI / "annotations" / "instances_val2017.json").is_file():
        pytest.skip(f"{COCO_MINI} not present")
    return COCO_MINI


@pytest.fixture(scope="session")
def s3_server():
    """moto in server mode on loopback; the process environment points s3fs (and Ray workers
    started later) at it through AWS_ENDPOINT_URL, as users point at MinIO/Ceph/R2."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket; returns its name."""
    import boto3

    name = f"detr-ray-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A local Ray cluster for the whole session (started after the S3 env is set so workers see it)."""
    import ray

    ray.init(
        num_cpus=4,  # logical CPUs: lets 2 train workers and read tasks share this 2-core machine
        object_store_memory=1 << 30,
        include_dashboard=False,
        log_to_driver=False,
        # The decoder's test hook (jobs/annotate/decoder_process.py): an object whose URI holds
        # this string kills the process that decodes it; no other test names one so.
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "DETR_RAY_TEST_KILL_DECODER": KILL_DECODER_NAME}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A random-weight tiny DETR (ResNet-18 backbone) saved by detr.save_pretrained."""
    from checkpoints import write_tiny_checkpoint

    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("weights") / "tiny-detr.pth"))


@pytest.fixture(scope="session")
def reference_r50(tmp_path_factory):
    """transformers' DETR-R50 with random weights, and the same weights in both public layouts."""
    from checkpoints import reference_model, write_hub_layout, write_original_layout

    folder = tmp_path_factory.mktemp("r50")
    model = reference_model(seed=0)
    hub = write_hub_layout(model, folder / "hub")
    original = write_original_layout(hub, folder / "detr-r50-random.pth")
    return model, hub, original
