"""Annotate job vs the bare model on all cores, and its memory at N vs 10 x N images, in one run on one machine.

    python benchmarks/bench_annotate.py [--images 40] [--scale 10] [--min-size 800] [--max-size 1333] [--no-memory]

1. Model only: the same ``Detector`` the job's actors run (DETR-R50, random weights, same
   batch size and aspect grouping) with torch on all of this machine's cores - what a user
   gets from the bare model - on images decoded and resized beforehand, in this process:
   the ceiling for the job. Measured before, between and after the job runs; the median is
   the reference.
2. End to end: ``python -m jobs.annotate`` on local folders of N and 10 x N images, as a user
   runs it (it starts its own local Ray cluster with this machine's CPUs and default actor
   layout), timed from launching the command to its exit. The steady-state rate is the
   difference of the two runs, (10N - N) images / (T(10N) - T(N)), in which the fixed cost
   cancels; the fixed cost is then T(N) - N / steady rate (interpreter and imports, Ray's
   start, checking the weights, starting the actor and loading them, the last write). The
   job's own summary line gives its start-up: the time from its start to the first annotated
   batch.
3. Memory (unless ``--no-memory``): two more runs of N and 10 x N, watched for the largest sum, over the job's process
   tree (driver, GCS, raylet with its object store, dashboard, workers and actors), of
   proportional set size (PSS), sampled every 0.25 s: PSS charges shared pages (the object
   store's shared memory, shared libraries) once across processes, where RSS would count them
   in every process that maps them. Reading PSS walks every page table (~60 ms of CPU per
   sample for a Ray cluster), which would take a sixth of a core from a 2-core job, so the
   throughput runs only read CPU times (~2 ms per sample, every 0.5 s).
4. CPU time, because a shared machine's load moves wall-clock figures: the model actor's
   images per CPU-second (difference of the two runs) against the model alone's
   (``time.process_time``), and the CPU time of the whole job's process tree.

Goals: steady-state end to end >= 0.9 x model only on all cores; fixed cost <= 10 s on a 2-core
machine; peak memory at 10 x N <= 1.2 x at N.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import detr  # noqa: E402
from jobs.annotate.decoding import prepare_images  # noqa: E402
from jobs.annotate.detector import Detector, DetectorConfig  # noqa: E402
from jobs.annotate.settings import CPU_BATCH_SIZE  # noqa: E402

COCO_VAL = ROOT.parent / "shared" / "data" / "coco-mini" / "val2017"
# The decode and write tasks' workers, as process_kind names them: by the task they ran at the last
# sample, or idle between tasks (a worker runs either kind of task).
DECODE_PROCESSES = ("decode_block", "ray::Write", "ray::IDLE")


@dataclass(frozen=True)
class ModelRun:
    images_per_second: float  # wall clock
    images_per_cpu_second: float  # what the model costs, whatever else runs on the machine


@dataclass(frozen=True)
class JobRun:
    images: int
    seconds: float  # the whole command, launch to exit
    job_seconds: float  # the job's own measure (write start to end: actor start-up included)
    startup_seconds: float  # the job's own: from its start to the first annotated batch
    peak_pss_bytes: int | None  # None: a throughput run, memory not sampled
    actor_cpu_seconds: float  # CPU time of the model actor process (weights loading included)
    tree_cpu_seconds: float  # CPU time of the whole job: driver, Ray daemons, decode and write workers, actor
    cpu_by_process: dict[str, float]  # CPU seconds by kind of process (the first words of its command line)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40, help="N: images in the first run")
    parser.add_argument("--scale", type=int, default=10, help="the second run uses scale x N images")
    parser.add_argument("--min-size", type=int, default=detr.MIN_SIZE, help="resize rule (the job's default)")
    parser.add_argument("--max-size", type=int, default=detr.MAX_SIZE)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=CPU_BATCH_SIZE,
        help="images per model call, for the job and the bare model (default: the job's CPU default)",
    )
    parser.add_argument("--work-dir", default=None, help="where images and outputs go (default: a temp dir)")
    parser.add_argument("--no-memory", action="store_true", help="skip the two memory runs")
    return parser.parse_args(argv)


def make_folder(folder: Path, count: int) -> None:
    """``count`` photos: COCO val2017 ones when present (repeated under new names), else synthetic."""
    folder.mkdir(parents=True)
    sources = sorted(COCO_VAL.glob("*.jpg"))
    rng = np.random.default_rng(0)
    for i in range(count):
        if sources:
            shutil.copyfile(sources[i % len(sources)], folder / f"{i:06d}.jpg")
        else:
            pixels = (rng.random((480, 640, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)


def model_only(weights: str, folder: Path, args: argparse.Namespace, threads: int) -> ModelRun:
    """Throughput of the job's Detector on pre-decoded, pre-resized batches."""
    uris = [f"file://{p}" for p in sorted(folder.glob("*.jpg"))]
    prepared = prepare_images(pa.table({"uri": uris}), min_size=args.min_size, max_size=args.max_size)
    detector = Detector(DetectorConfig(weights=weights, threshold=0.7, cpu_threads=threads))
    detector(prepared.slice(0, args.batch_size))  # warm-up
    started, started_cpu = time.perf_counter(), time.process_time()
    for start in range(0, prepared.num_rows, args.batch_size):
        detector(prepared.slice(start, args.batch_size))
    return ModelRun(
        prepared.num_rows / (time.perf_counter() - started), prepared.num_rows / (time.process_time() - started_cpu)
    )


def run_job(folder: Path, output: Path, weights: str, args: argparse.Namespace, *, memory: bool) -> JobRun:
    """One ``python -m jobs.annotate`` run; ``memory`` samples PSS (costly), otherwise only CPU times."""
    command = [
        sys.executable,
        "-m",
        "jobs.annotate",
        str(folder),
        str(output),
        "--weights",
        weights,
        "--min-size",
        str(args.min_size),
        "--max-size",
        str(args.max_size),
        "--batch-size",
        str(args.batch_size),
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local cluster every run
    with tempfile.TemporaryFile() as log:
        launched = time.perf_counter()
        job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        peak, cpu = 0, {}
        while job.poll() is None:
            members = process_tree(job.pid)
            if memory:
                peak = max(peak, tree_pss(members))
            for pid, (name, cpu_time) in cpu_seconds(members).items():  # an exited process keeps its last name
                cpu[pid] = (name or cpu.get(pid, ("", 0.0))[0], cpu_time)
            time.sleep(0.25 if memory else 0.5)
        seconds = time.perf_counter() - launched
        log.seek(0)
        text = log.read().decode(errors="replace")
    if job.returncode != 0:
        raise RuntimeError(f"annotate failed ({job.returncode}):\n{text[-3000:]}")
    summary = next(line for line in text.splitlines() if line.startswith("annotate: "))
    job_seconds = float(summary.split(" over ")[1].split(" s")[0])
    startup = float(summary.split("first image after ")[1].split(" s")[0])
    rows = sum(pq.read_metadata(p).num_rows for p in output.glob("*.parquet"))
    actor_cpu = sum(seconds for name, seconds in cpu.values() if "MapBatches(Detector)" in name)
    by_process: dict[str, float] = {}
    for name, cpu_time in cpu.values():
        kind = process_kind(name)
        by_process[kind] = by_process.get(kind, 0.0) + cpu_time
    total_cpu = sum(t for _, t in cpu.values())
    return JobRun(rows, seconds, job_seconds, startup, peak if memory else None, actor_cpu, total_cpu, by_process)


def process_kind(command_line: str) -> str:
    """A short name for a process of the job: Ray's daemons by executable, workers by what they ran."""
    words = command_line.split()
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0]
    if "-m" in words and words[words.index("-m") + 1 :]:
        return words[words.index("-m") + 1]
    return (
        Path(words[0]).name if not words[0].endswith("python") else Path(words[1]).name if len(words) > 1 else "python"
    )


def process_tree(pid: int) -> set[int]:
    """A process and all its descendants, from /proc (Linux)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        parents[int(stat.parent.name)] = int(fields[1])
    tree, frontier = {pid}, [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier and child not in tree]
        tree.update(children)
        frontier = children
    return tree


def cpu_seconds(members: set[int]) -> dict[int, tuple[str, float]]:
    """(command line, user + system CPU seconds so far) of each process."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for member in members:
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            name = Path(f"/proc/{member}/cmdline").read_text().replace("\0", " ")
        except OSError:
            continue
        found[member] = (name, (int(fields[11]) + int(fields[12])) / ticks)
    return found


def tree_pss(members: set[int]) -> int:
    """Sum of PSS (bytes) over processes, from /proc (Linux)."""
    total = 0
    for member in members:
        try:
            for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def total_memory_gib() -> float:
    lines = Path("/proc/meminfo").read_text().splitlines()
    kib = next(int(line.split()[1]) for line in lines if line.startswith("MemTotal:"))
    return kib / 2**20


def main(args: argparse.Namespace) -> None:
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-annotate-"))
    torch.manual_seed(0)
    weights = str(work / "detr-r50-random.pth")
    detr.save_pretrained(detr.DETR(detr.DetrConfig()).eval(), weights)  # R50 architecture, random weights
    small, large = work / "images-n", work / "images-10n"
    make_folder(small, args.images)
    make_folder(large, args.images * args.scale)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{total_memory_gib():.0f} GiB, load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}"
    )
    source = "COCO val2017" if COCO_VAL.is_dir() else "synthetic"
    print(f"images: {source}, resized to {args.min_size}/{args.max_size}, batch size {args.batch_size}")

    cores = os.cpu_count() or 1
    # Other work on a shared machine shifts every figure: measure the model between and
    # around the job runs and compare against the median.
    model = [model_only(weights, small, args, cores)]
    run_n = run_job(small, work / "out-n", weights, args, memory=False)
    model.append(model_only(weights, small, args, cores))
    run_10n = run_job(large, work / "out-10n", weights, args, memory=False)
    model.append(model_only(weights, small, args, cores))

    reference = float(np.median([m.images_per_second for m in model]))
    reference_cpu = float(np.median([m.images_per_cpu_second for m in model]))
    steady = (run_10n.images - run_n.images) / (run_10n.seconds - run_n.seconds)
    actor_cpu = (run_10n.images - run_n.images) / (run_10n.actor_cpu_seconds - run_n.actor_cpu_seconds)
    print(
        f"model only ({cores} threads, all cores): median {reference:.3f} img/s of "
        f"{', '.join(f'{m.images_per_second:.3f}' for m in model)}; {reference_cpu:.3f} img per CPU-second"
    )
    for name, run in (("N", run_n), (f"{args.scale}xN", run_10n)):
        print(
            f"end to end, {name} = {run.images} images: {run.seconds:.1f} s launch to exit, job summary "
            f"{run.images / run.job_seconds:.3f} img/s over {run.job_seconds:.1f} s, first image after "
            f"{run.startup_seconds:.1f} s; CPU time: actor {run.actor_cpu_seconds:.0f} s, whole job "
            f"{run.tree_cpu_seconds:.0f} s"
        )
    busiest = sorted(run_10n.cpu_by_process.items(), key=lambda item: -item[1])[:8]
    print(f"CPU seconds by process, {args.scale}xN run: " + ", ".join(f"{k} {v:.1f}" for k, v in busiest))
    # What decoding really takes next to the model: why the actor runs torch on every core.
    decode = [
        sum(cpu for kind, cpu in run.cpu_by_process.items() if any(name in kind for name in DECODE_PROCESSES))
        for run in (run_n, run_10n)
    ]
    decode_ms = 1000 * (decode[1] - decode[0]) / (run_10n.images - run_n.images)
    print(
        f"decode and write workers: {decode_ms:.0f} ms of CPU per image "
        f"(worker start-up excluded), model actor {1000 / actor_cpu:.0f} ms"
    )
    print(f"end to end, steady state: {steady:.3f} img/s; model actor: {actor_cpu:.3f} img per CPU-second")
    print(f"ratio end to end (steady) / model only on all cores, wall clock: {steady / reference:.2f} (goal >= 0.9)")
    print(f"ratio actor / model only, per CPU-second: {actor_cpu / reference_cpu:.2f}")
    print(
        f"fixed cost (N run, launch to exit, less N images at the steady rate): "
        f"{run_n.seconds - run_n.images / steady:.1f} s (goal <= 10 s on 2 cores); "
        f"{args.scale}xN run: {run_10n.seconds - run_10n.images / steady:.1f} s"
    )
    if not args.no_memory:
        memory_n = run_job(small, work / "mem-n", weights, args, memory=True)
        memory_10n = run_job(large, work / "mem-10n", weights, args, memory=True)
        assert memory_n.peak_pss_bytes and memory_10n.peak_pss_bytes
        print(
            f"peak PSS (separate runs): N {memory_n.peak_pss_bytes / 2**30:.2f} GiB, {args.scale}xN "
            f"{memory_10n.peak_pss_bytes / 2**30:.2f} GiB; ratio "
            f"{memory_10n.peak_pss_bytes / memory_n.peak_pss_bytes:.2f} (goal <= 1.2)"
        )
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(parse_args())
