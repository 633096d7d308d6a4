"""Benchmark: resuming over many completed images, and listing/manifest throughput, simulated.

Nothing is downloaded: a synthetic S3 endpoint (:mod:`synthetic_s3`) serves a bucket of N
generated keys with S3-like latency per listing page, and OUTPUT is filled with K completed rows
written the way the job writes them.

1. Resume: for each K, OUTPUT holds K done rows (the first K keys, as a killed run leaves them)
   and the bucket K + NEW keys. Measured: indexing the K rows once (what the start after a killed
   run does), then a whole ``python -m jobs.annotate`` run against a Ray head: time to the first
   annotated image, wall time, peak memory of the driver and of every Ray worker process.
2. Listing: keys/s of one ListObjectsV2 stream and of the job's parallel listing stage, with the
   peak memory of its processes.
3. Manifest: rows/s and peak memory of the job's manifest stage (parts -> key ranges -> minus done)
   on a Parquet manifest of M rows.

    python benchmarks/bench_resume.py --completed 100000 1000000 --index-only 10000000 25000000 \\
        --listing-keys 1000000 --manifest-rows 1000000 10000000
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]

from synthetic_s3 import KEY_FORMAT, SyntheticS3  # noqa: E402

from coco import DETECTIONS_SCHEMA  # noqa: E402

BUCKET = "bench"
ROWS_PER_FILE = 10_000  # done rows per output file: the job writes --rows-per-file (default 1000) or more
NO_DETECTIONS = pa.array([], DETECTIONS_SCHEMA.field("detections").type.value_type)


def write_completed(output: Path, count: int) -> None:
    """``count`` done rows for the first ``count`` keys, in files of the job's naming and schema."""
    output.mkdir(parents=True, exist_ok=True)
    for number, start in enumerate(range(0, count, ROWS_PER_FILE)):
        n = min(ROWS_PER_FILE, count - start)
        uris = pa.array([f"s3://{BUCKET}/{KEY_FORMAT.format(i)}" for i in range(start, start + n)])
        table = pa.table(
            {
                "uri": uris,
                "width": pa.array([96] * n, pa.int32()),
                "height": pa.array([64] * n, pa.int32()),
                "detections": pa.ListArray.from_arrays(
                    pa.array([0] * (n + 1), pa.int32()),
                    pa.array([], DETECTIONS_SCHEMA.field("detections").type.value_type),
                ),
                "error": pa.nulls(n, pa.string()),
                "model": pa.array(["bench"] * n),
            },
            schema=DETECTIONS_SCHEMA,
        )
        pq.write_table(table, output / f"annotations-killed-bench_{number:06d}-0.parquet")


class PeakMemory:
    """Peak resident memory (VmHWM) of every process descending from ``root`` (a job's driver and the
    local Ray cluster it starts), sampled in a background thread."""

    def __init__(self, root: int, interval: float = 0.2) -> None:
        self.root, self.interval, self.peaks = root, interval, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for pid, (title, peak) in _descendants(self.root).items():
                key = f"{title} [{pid}]"
                self.peaks[key] = max(self.peaks.get(key, 0.0), peak)

    def largest(self, prefix: str = "") -> float:
        return max((v for k, v in self.peaks.items() if k.startswith(prefix)), default=0.0)


def _descendants(root: int) -> dict[int, tuple[str, float]]:
    """{pid: (title, VmHWM MiB)} of the processes below ``root``."""
    parents, info = {}, {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
            title = (status.parent / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        pid = int(status.parent.name)
        parents[pid] = int(re.search(r"PPid:\s+(\d+)", text).group(1))
        peak = re.search(r"VmHWM:\s+(\d+) kB", text)
        info[pid] = (title, int(peak.group(1)) / 1024 if peak else 0.0)
    found = {}
    for pid, value in info.items():
        node = pid
        while node and node != root:
            node = parents.get(node, 0)
        if node == root:
            found[pid] = value
    return found


def measure_indexing(output: Path) -> tuple[float, float]:
    """Wall seconds and peak MiB of bringing the index in line with K unindexed rows (a subprocess)."""
    code = (
        "import resource, sys, time; from jobs.annotate.output import OutputFolder; "
        f"t = time.perf_counter(); OutputFolder({str(output)!r}).done_segments(); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    seconds, peak = done.stdout.split()
    return float(seconds), float(peak)


def measure_run(output: Path, endpoint: str, weights: str, new: int, env: dict, source: str | None = None) -> dict:
    """One annotate run over the synthetic bucket (or ``source``, a manifest of its keys): first image,
    wall time, peak memory per process."""
    before = set(output.glob("annotations-*.parquet"))
    # The job in a wrapper that reports its own peak memory (the driver's) on exit.
    wrapper = (
        "import resource, runpy, sys; sys.argv = ['annotate', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('jobs.annotate', run_name='__main__')\n"
        "finally:\n    print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr)"
    )
    command = [
        sys.executable, "-c", wrapper, source or f"s3://{BUCKET}/images", str(output), "--weights", weights,
        "--min-size", "64", "--max-size", "96", "--threshold", "0.5", "--rows-per-file", "1", "--limit", str(new),
        "--cpus-per-actor", "1",
    ]  # fmt: skip
    started = time.perf_counter()
    job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = None
    with PeakMemory(job.pid) as memory:
        while job.poll() is None:
            if first is None and set(output.glob("annotations-*.parquet")) - before:
                first = time.perf_counter() - started
            time.sleep(0.05)
    wall = time.perf_counter() - started
    stderr = job.stderr.read()
    if job.returncode:
        raise RuntimeError(f"annotate failed:\n{stderr[-3000:]}")
    return {
        "first_image_s": first,
        "wall_s": wall,
        "driver_peak_mib": float(re.findall(r"^peak (\S+)$", stderr, re.M)[-1]),
        "worker_peak_mib": memory.largest("ray::"),
        "summary": job.stdout.read().strip().splitlines()[-1],
    }


def write_manifest(path: Path, count: int) -> None:
    """A Parquet manifest of the bucket's first ``count`` keys, in row groups of a million."""
    with pq.ParquetWriter(path, pa.schema([("uri", pa.string())])) as writer:
        for start in range(0, count, 1_000_000):
            stop = min(count, start + 1_000_000)
            writer.write_table(pa.table({"uri": [f"s3://{BUCKET}/{KEY_FORMAT.format(i)}" for i in range(start, stop)]}))


def bench_resume(args: argparse.Namespace, base: Path, env: dict, *, manifest: bool = False) -> None:
    """Resume runs over K done rows. INPUT is the bucket's prefix, or with ``manifest`` a Parquet manifest
    of its K + NEW keys: reading that is parallel and fast, so the run's time shows what resuming over K
    done rows costs, not how long listing K keys takes."""
    from checkpoints import write_tiny_checkpoint

    weights = write_tiny_checkpoint(str(base / "tiny.pth"))
    title = "completed rows K (manifest of K + new)" if manifest else "completed rows K"
    print(f"\n| {title} | index K once (s, peak MiB) | first image (s) | run wall (s) | driver peak MiB "
          "| largest Ray process peak MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for completed in args.manifest_completed if manifest else args.completed:
        output = base / f"out-{completed}"
        write_completed(output, completed)
        source = None
        if manifest:
            source = base / f"manifest-{completed}.parquet"
            write_manifest(source, completed + args.new)
        index_s, index_mib = measure_indexing(output)
        with SyntheticS3(BUCKET, completed + args.new, args.delay) as endpoint:
            env_run = dict(env, AWS_ENDPOINT_URL=endpoint)
            run = measure_run(output, endpoint, weights, args.new, env_run, str(source) if source else None)
        print(
            f"| {completed:,} | {index_s:.1f} s, {index_mib:.0f} | {run['first_image_s']:.1f} | {run['wall_s']:.1f} "
            f"| {run['driver_peak_mib']:.0f} | {run['worker_peak_mib']:.0f} |",
            flush=True,
        )
        shutil.rmtree(output)
        if source is not None:
            source.unlink()


def bench_indexing(args: argparse.Namespace, base: Path) -> None:
    print(
        "\n| completed rows K (indexing only) | write K rows (s) | index K once (s) | peak MiB | index on disk (MiB) |"
    )
    print("|---|---|---|---|---|")
    for completed in args.index_only:
        output = base / f"index-{completed}"
        started = time.perf_counter()
        write_completed(output, completed)
        written = time.perf_counter() - started
        index_s, index_mib = measure_indexing(output)
        index_bytes = sum(p.stat().st_size for p in (output / "_index").rglob("*") if p.is_file())
        print(
            f"| {completed:,} | {written:.0f} | {index_s:.1f} | {index_mib:.0f} | {index_bytes / 2**20:.0f} |",
            flush=True,
        )
        shutil.rmtree(output)


def bench_listing(args: argparse.Namespace, env: dict) -> None:
    import ray

    from jobs.annotate.listing import plan_listing
    from storage import filesystem_for, iter_sorted

    print("\n| keys | one stream (keys/s, first 100k) | job's listing stage (keys/s) | ranges | listing peak MiB |")
    print("|---|---|---|---|---|")
    for count in args.listing_keys:
        with SyntheticS3(BUCKET, count, args.delay) as endpoint:
            os.environ.update(dict(env, AWS_ENDPOINT_URL=endpoint))
            fs, root = filesystem_for(f"s3://{BUCKET}/images")
            started, seen = time.perf_counter(), 0
            for page in iter_sorted(fs, root):
                seen += len(page)
                if seen >= 100_000:
                    break
            single = seen / (time.perf_counter() - started)
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"AWS_ENDPOINT_URL": endpoint, "PYTHONPATH": str(ROOT)}})  # fmt: skip
            try:
                parts, _ = plan_listing(f"s3://{BUCKET}/images")
                with PeakMemory(os.getpid()) as memory:
                    started = time.perf_counter()
                    listed = _listing_stage(parts).count()
                    parallel = listed / (time.perf_counter() - started)
                peak = memory.largest("ray::")
            finally:
                ray.shutdown()
        assert listed == count, (listed, count)
        print(f"| {count:,} | {single:,.0f} | {parallel:,.0f} | {len(parts)} | {peak:.0f} |", flush=True)


def _listing_stage(parts):
    import ray

    from jobs.annotate.listing import list_folder_task, part_row
    from jobs.annotate.pipeline import LISTING_CONCURRENCY

    rows = [part_row(p) for p in parts]
    return ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        list_folder_task, batch_size=1, batch_format="pyarrow", num_cpus=0,
        concurrency=min(LISTING_CONCURRENCY, len(rows)),
        fn_kwargs={"output": "/nonexistent", "segments": [], "extensions": ("jpg",)},
    )  # fmt: skip


def bench_manifest(args: argparse.Namespace, base: Path) -> None:
    import ray

    from jobs.annotate.listing import (
        manifest_boundaries,
        part_row,
        plan_listing,
        read_manifest_task,
        remaining_in_range_task,
    )
    from jobs.annotate.pipeline import LISTING_CONCURRENCY

    print("\n| manifest rows | parts | rows/s through parts -> ranges -> minus done | listing peak MiB |")
    print("|---|---|---|---|")
    for count in args.manifest_rows:
        manifest = base / f"manifest-{count}.parquet"
        write_manifest(manifest, count)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})  # fmt: skip
        try:
            parts, _ = plan_listing(str(manifest))
            memory = PeakMemory(os.getpid()).__enter__()
            started = time.perf_counter()
            boundaries = manifest_boundaries(parts, len(parts))
            rows = [part_row(p) for p in parts]
            entries = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
                read_manifest_task, batch_size=1, batch_format="pyarrow", num_cpus=0,
                concurrency=min(LISTING_CONCURRENCY, len(rows)), fn_kwargs={"boundaries": boundaries},
            )  # fmt: skip
            remaining = entries.groupby("range", num_partitions=len(boundaries) + 1).map_groups(
                remaining_in_range_task, batch_format="pyarrow", num_cpus=0.25,
                fn_kwargs={"output": "/nonexistent", "segments": []},
            )  # fmt: skip
            total = remaining.count()
            rate = total / (time.perf_counter() - started)
            memory.__exit__()
            peak = memory.largest("ray::")
        finally:
            ray.shutdown()
        assert total == count, (total, count)
        print(f"| {count:,} | {len(parts)} | {rate:,.0f} | {peak:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--completed", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument(
        "--index-only",
        type=int,
        nargs="*",
        default=[],
        help="completed rows K for which only the indexing is measured (no run: its listing of K keys takes long)",
    )
    parser.add_argument(
        "--manifest-completed",
        type=int,
        nargs="*",
        default=[],
        help="completed rows K for resume runs whose INPUT is a Parquet manifest of the K + NEW keys",
    )
    parser.add_argument("--new", type=int, default=20, help="new images per resume run")
    parser.add_argument("--listing-keys", type=int, nargs="*", default=[1_000_000])
    parser.add_argument("--manifest-rows", type=int, nargs="*", default=[1_000_000])
    parser.add_argument("--delay", type=float, default=0.05, help="seconds per listing request (S3: ~0.05-0.1)")
    args = parser.parse_args()
    env = dict(
        os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
        PYTHONPATH=str(ROOT),
    )  # fmt: skip
    print(f"machine: {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; listing delay {args.delay} s")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as folder:
        if args.completed:
            bench_resume(args, Path(folder), env)
        if args.manifest_completed:
            bench_resume(args, Path(folder), env, manifest=True)
        if args.index_only:
            bench_indexing(args, Path(folder))
        if args.listing_keys:
            bench_listing(args, env)
        if args.manifest_rows:
            bench_manifest(args, Path(folder))


if __name__ == "__main__":
    main()
