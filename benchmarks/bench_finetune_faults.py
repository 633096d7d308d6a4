"""Work lost to a killed worker, with epoch-end checkpoints only ("before") and with mid-epoch ones ("after"),
and what a checkpoint costs the training thread with a synchronous and an asynchronous upload.

    python benchmarks/bench_finetune_faults.py                 # both parts
    python benchmarks/bench_finetune_faults.py --part kill     # only the kill runs (4 runs of ~1-2 min on 2 cores)
    python benchmarks/bench_finetune_faults.py --part checkpoint-cost

Kill part: a local Ray cluster (4 logical CPUs), 2 Ray Train workers on CPU, the tiny DETR of
tests/finetune (ResNet-18, width 64), synthetic 96 px shapes, batch 2 per worker, 3 epochs; the
run folder is a local folder. For each policy a clean run and a faulted one: the faulted run's
worker is SIGKILLed once rank 0 has logged the step 80% into epoch 1 (read from its local
TensorBoard folder, ``--log-every-steps 1``). Work lost = faulted wall time / clean wall time (1.0 = nothing lost;
the restart of the worker group is part of the loss), and in training steps (replayed steps included) over
the clean run's, which other processes' load does not change.

Checkpoint-cost part: one checkpoint of DETR-R50 (weights + AdamW state, as jobs.finetune.run_state
writes it) saved to a local temp folder, then uploaded to a moto S3 server on loopback with
pyarrow's copy_files (Ray Train's upload). A synchronous upload blocks training for save + upload;
Ray Train's ASYNC mode (what the job uses) for the save only.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "--weights scratch --backbone resnet18 --hidden-dim 64 --num-heads 4 --enc-layers 1 --dec-layers 2 "
    "--ffn-dim 128 --num-queries 10 --dropout 0 --min-size 96 --max-size 160"
).split()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("all", "kill", "checkpoint-cost"), default="all")
    parser.add_argument("--images", type=int, default=96, help="training images (steps per epoch = images / 4)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--every-steps", type=int, default=4, help="the 'after' policy's --checkpoint-every-steps")
    parser.add_argument("--kill-at", type=float, default=0.8, help="fraction of epoch 1 at which a worker is killed")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of (before, after) clean + faulted runs")
    return parser.parse_args(argv)


def _train_workers() -> list[dict]:
    from ray._private import state

    return [a for a in state.actors().values() if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"]


def latest_logged_step(since: float) -> int:
    """The highest global step rank 0 has logged to its local TensorBoard folder (``--log-every-steps 1``) in a
    run started at ``since``: how the benchmark sees training progress on this machine without touching it."""
    import glob
    import struct

    from tensorboardX.proto.event_pb2 import Event

    best = -1
    for folder in glob.glob(f"{tempfile.gettempdir()}/detr-ray-tensorboard-*"):
        if os.path.getmtime(folder) < since:
            continue
        for name in os.listdir(folder):
            data = Path(folder, name).read_bytes()
            offset = 0
            while offset + 12 <= len(data):
                (length,) = struct.unpack("<Q", data[offset : offset + 8])
                if offset + 12 + length > len(data):
                    break  # a record being written
                event = Event.FromString(data[offset + 12 : offset + 12 + length])
                offset += 12 + length + 4
                if any(v.tag == "train/loss" for v in event.summary.value):
                    best = max(best, event.step)
    return best


def timed_run(data: str, output: str, policy: list[str], args, kill_at_step: int | None) -> tuple[float, dict]:
    """Wall seconds of one job run and its metrics; with ``kill_at_step``, a worker is SIGKILLed once training
    has logged that global step."""
    from jobs.finetune import main, parse_config

    argv = [
        "--train-images",
        f"{data}/images",
        "--train-annotations",
        f"{data}/annotations.json",
        "--output",
        output,
        *TINY,
        "--workers",
        "2",
        "--batch-size",
        "2",
        "--epochs",
        str(args.epochs),
        "--loader-workers",
        "1",
        "--max-failures",
        "1",
        "--log-every-steps",
        "1",
        *policy,
    ]
    outcome: dict = {}
    started, since = time.perf_counter(), time.time()
    job = threading.Thread(target=lambda: outcome.update(result=main(parse_config(argv))), daemon=True)
    job.start()
    if kill_at_step is not None:
        while latest_logged_step(since) < kill_at_step:
            assert job.is_alive(), "the run ended before the kill"
            time.sleep(0.05)
        os.kill(_train_workers()[0]["Pid"], signal.SIGKILL)
    job.join()
    return time.perf_counter() - started, outcome["result"].metrics


def kill_part(args) -> None:
    import ray

    from jobs.synthetic_shapes import ShapesConfig, generate

    work = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    generate(str(work / "train"), args.images, seed=0, config=ShapesConfig(96, 30, 60, max_objects=1))
    env = {"env_vars": {"PYTHONPATH": str(ROOT)}}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env=env)
    policies = {
        "before: epoch-end checkpoints only": ["--checkpoint-every-minutes", "0"],
        f"after: + every {args.every_steps} steps (async upload)": [
            "--checkpoint-every-minutes",
            "0",
            "--checkpoint-every-steps",
            str(args.every_steps),
        ],
    }
    steps = args.images // 4
    kill_step = steps + round(args.kill_at * steps)
    rows = []
    for repeat in range(args.repeats):  # policies alternate, so load from other processes hits both alike
        for i, (name, policy) in enumerate(policies.items()):
            clean, metrics = timed_run(str(work / "train"), str(work / f"clean{repeat}-{i}"), policy, args, None)
            epoch1 = metrics["epochs"][1]["epoch_seconds"]
            faulted, faulted_metrics = timed_run(
                str(work / "train"), str(work / f"faulted{repeat}-{i}"), policy, args, kill_step
            )
            step = faulted_metrics["epochs"][-1]["resumed_from_step"]
            same = [round(m["loss"], 6) for m in metrics["epochs"]] == [
                round(m["loss"], 6) for m in faulted_metrics["epochs"]
            ]
            rows.append((name, clean, faulted, epoch1, step, metrics["epochs"], os.getloadavg()[0]))
            print(
                f"{name}: clean {clean:.1f}s, faulted {faulted:.1f}s, resumed at step {step}; per-epoch losses "
                f"{'equal' if same else 'DIFFER'} to 6 decimals",
                flush=True,
            )
    ray.shutdown()
    shutil.rmtree(work)  # the runs' checkpoints: GBs
    print(f"\n{args.images} images, {steps} steps/epoch, {args.epochs} epochs, kill at step {kill_step} (epoch 1)")
    # Steps trained, replays included, over the clean run's: the part of the loss no machine load changes.
    total = steps * args.epochs
    print("| policy | clean s | faulted s | **work lost** (wall) | steps / clean | resumed at step | epoch s | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, clean, faulted, epoch1, step, history, load in rows:
        mid = sum(m.get("checkpoint_seconds", 0.0) for m in history)
        count = sum(m.get("mid_epoch_checkpoints", 0) for m in history)
        cost = f"; {count} mid-epoch saves took {mid:.2f}s" if count else ""
        ratio, replay = f"**{faulted / clean:.2f}x**", f"{(total + kill_step - step) / total:.2f}x"
        timing = f"{epoch1:.1f}{cost} | {load:.1f}"
        print(f"| {name} | {clean:.1f} | {faulted:.1f} | {ratio} | {replay} | {step} | {timing} |")


def checkpoint_cost_part() -> None:
    import statistics

    import pyarrow.fs
    import torch
    from moto.server import ThreadedMotoServer

    import detr
    from jobs.finetune.engine import build_optimizer
    from jobs.finetune.fingerprint import run_fingerprint
    from jobs.finetune.run_state import RunProgress, save_checkpoint
    from jobs.finetune.settings import FinetuneConfig

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=5123, verbose=False)
    server.start()
    os.environ.update(
        AWS_ENDPOINT_URL="http://127.0.0.1:5123",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    import boto3

    boto3.client("s3", endpoint_url="http://127.0.0.1:5123").create_bucket(Bucket="bench-checkpoints")
    from storage import arrow_filesystem

    s3, _ = arrow_filesystem("s3://bench-checkpoints/x")
    model = detr.DETR(detr.DetrConfig(num_classes=3))
    config = FinetuneConfig("unused", "unused", "unused")
    optimizer = build_optimizer(model, config)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # AdamW's state: two moments per parameter
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 200)
    progress = RunProgress(run_fingerprint(config, model.categories, model.config))
    saves, uploads, size = [], [], 0
    for i in range(3):
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            save_checkpoint(Path(folder), model, optimizer, scheduler, None, [{"cpu": torch.get_rng_state()}], progress)
            saves.append(time.perf_counter() - started)
            size = sum(f.stat().st_size for f in Path(folder).iterdir())
            started = time.perf_counter()
            pyarrow.fs.copy_files(folder, f"bench-checkpoints/run/checkpoint_{i}", destination_filesystem=s3)
            uploads.append(time.perf_counter() - started)
    server.stop()
    save, upload = statistics.median(saves), statistics.median(uploads)
    print(f"\nDETR-R50 checkpoint: {size / 1e6:.0f} MB (weights + AdamW state), medians of 3")
    print("| upload | training thread blocked s |")
    print("| --- | --- |")
    print(f"| synchronous (save + upload to moto S3 on loopback) | {save + upload:.2f} ({save:.2f} + {upload:.2f}) |")
    print(f"| asynchronous (save; Ray Train uploads in a thread) | {save:.2f} |")


def main(args: argparse.Namespace) -> None:
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()}")
    if args.part in ("all", "kill"):
        kill_part(args)
    if args.part in ("all", "checkpoint-cost"):
        checkpoint_cost_part()
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main(parse_args())
