"""jobs.finetune on a GPU through Ray Train: one epoch of a tiny DETR with --gpus-per-worker 1 --precision bf16.

Needs CUDA and Ray; skipped otherwise. It uses the session's Ray cluster when one is running, else starts
a local one without the S3 server (a GPU machine may have Ray but not the test extra's moto).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import detr

pytest.importorskip("ray")
from jobs.finetune import main, parse_config  # noqa: E402 - its driver imports Ray
from jobs.synthetic_shapes import ShapesConfig, generate  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TINY = ["--weights", "scratch", "--backbone", "resnet18", "--hidden-dim", "64", "--num-heads", "4"]
TINY += ["--enc-layers", "1", "--dec-layers", "2", "--ffn-dim", "128", "--num-queries", "10", "--dropout", "0"]


@pytest.fixture(scope="module")
def local_ray():
    import ray

    started = not ray.is_initialized()
    if started:
        root = str(Path(__file__).resolve().parents[2])
        ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": root}})
    yield ray
    if started:
        ray.shutdown()


def test_one_epoch_on_a_gpu_in_bf16(local_ray, tmp_path):
    if local_ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the Ray cluster sees no GPU")
    root = str(tmp_path)
    generate(f"{root}/train", 16, seed=0, config=ShapesConfig(image_size=128, max_objects=2))
    generate(f"{root}/val", 8, seed=1, config=ShapesConfig(image_size=128, max_objects=2))
    summary = main(
        parse_config(
            [
                *["--train-images", f"{root}/train/images", "--train-annotations", f"{root}/train/annotations.json"],
                *["--val-images", f"{root}/val/images", "--val-annotations", f"{root}/val/annotations.json"],
                *["--output", f"{root}/out", *TINY, "--min-size", "128", "--max-size", "213"],
                *["--workers", "1", "--gpus-per-worker", "1", "--precision", "bf16", "--epochs", "1"],
                *["--batch-size", "4", "--loader-workers", "0"],
            ]
        )
    )
    (epoch,) = summary.metrics["epochs"]
    assert math.isfinite(epoch["loss"]) and 0.0 <= epoch["val_AP50"] <= 1.0
    final = detr.from_pretrained(f"{root}/out/final.pth")
    assert all(torch.isfinite(p).all() for p in final.parameters()), "bf16 steps left the fp32 weights finite"
