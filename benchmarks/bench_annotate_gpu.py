"""The annotate data path on one GPU, without Ray: CPU decoding on the other cores feeding the job's
model stage, against the model stage and the bare model on images decoded beforehand.

    python benchmarks/bench_annotate_gpu.py                          # CUDA: COCO-sized and 12 MP photos
    python benchmarks/bench_annotate_gpu.py --gpu-decode --job       # + nvJPEG decoding, + the real job (Ray)
    python benchmarks/bench_annotate_gpu.py --device cpu --images 24 --large-images 8 --min-size 160 \\
        --max-size 267 --batch-size 4 --workers 1 --gpu-decode       # the plumbing, on a CPU

Photos: the six COCO val2017 photos in jobs/annotate/sample_images (640 px, as COCO stores them),
repeated under new names to --images files, and the same six upscaled to 12 MP (4032x3024, JPEG
quality 92) repeated to --large-images files, in a temporary folder. Model: DETR-R50 with random
weights, class head scaled so scores spread as a trained model's (the work per image does not depend
on the weights), --precision autocast, the job's resize rule
and GPU batch size by default. Each figure in images per second, for each photo size:

1. model forward: the model alone on batches already normalized, padded and on the device - the
   ceiling.
2. Detector, prepared: the job's model stage (``jobs.annotate.detector.Detector``) on prepared
   batches (``PREPARED_SCHEMA``) decoded beforehand: Arrow to tensors, normalize and pad on the
   host in float32, pinned copy, model, post-processing, rows. "uint8 upload" is the same with
   ``detr.preprocessing.collate_on``: uint8 copied to the device, normalized there.
3. pipeline: ``prepare_images`` (the job's CPU stage: read, decode, resize) in --workers processes,
   each batch handed over as an Arrow IPC file in shared memory (read without a copy, as an actor
   reads a block from Ray's object store), feeding the Detector in this process; timed from the
   first batch done to the last, so start-up is left out. Its ratio to 2. is the issue's goal (>= 0.9).
4. decode only: the same pool with nothing consuming: what the CPUs can prepare.
5. --gpu-decode (NOT YET RUN ON A GPU): ``benchmarks/gpu_jpeg.py`` - file bytes read here (a thread
   reads ahead), nvJPEG decoding of the whole batch, resize and normalization on the device, model,
   post-processing; its detections are compared with the CPU-decoded ones (the CPU path decodes a
   JPEG at least twice the input size at 1/2-1/8 scale - the 12 MP photos - so there they differ by
   more than the decoders do).
6. --job (--job-only: just this and its peer 2.), when Ray is importable: ``python -m jobs.annotate``
   on the COCO-sized folder and on one --job-scale times larger, as a user runs it (its own local
   Ray cluster, one GPU actor, decoding on the other cores); steady state = extra images / extra seconds.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]

import detr  # noqa: E402
from detr.preprocessing import collate_on  # noqa: E402
from jobs.annotate.decoding import prepare_images  # noqa: E402
from jobs.annotate.detector import Detector, DetectorConfig, aspect_groups  # noqa: E402
from jobs.annotate.settings import CPU_BATCH_SIZE, GPU_BATCH_SIZE  # noqa: E402

from checkpoints import write_decisive_checkpoint  # noqa: E402

SAMPLE_PHOTOS = ROOT / "jobs" / "annotate" / "sample_images"
LARGE = (3024, 4032)  # 12 MP, a phone camera's frame (height, width of a landscape photo)
SHM = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--precision", default="bf16", choices=detr.PRECISIONS, help="the Detector's precision")
    parser.add_argument("--images", type=int, default=2048, help="COCO-sized files")
    parser.add_argument("--large-images", type=int, default=384, help="12 MP files (0: none)")
    parser.add_argument("--min-size", type=int, default=detr.MIN_SIZE)
    parser.add_argument("--max-size", type=int, default=detr.MAX_SIZE)
    parser.add_argument("--batch-size", type=int, default=None, help="images per model call (default: the job's)")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: cores - 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of the model-only figures (median)")
    parser.add_argument("--gpu-decode", action="store_true", help="also time nvJPEG decoding (benchmarks/gpu_jpeg.py)")
    parser.add_argument("--job", action="store_true", help="also run python -m jobs.annotate (needs Ray)")
    parser.add_argument(
        "--job-only", action="store_true", help="only the job and its peer (Detector, prepared; COCO-sized)"
    )
    parser.add_argument("--job-scale", type=int, default=5, help="the job's second run has this many times --images")
    parser.add_argument("--work-dir", default=None, help="where the photos go (default: a temporary folder)")
    return parser.parse_args(argv)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- the photos --------------------------------------------------------------------------------------------


def make_folder(folder: Path, sources: list[Path], count: int) -> list[str]:
    """``count`` files cycling through ``sources`` (hard links where possible); their file:// URIs."""
    folder.mkdir(parents=True, exist_ok=True)
    uris = []
    for i in range(count):
        source, target = sources[i % len(sources)], folder / f"{i:06d}.jpg"
        if not target.exists():
            try:
                os.link(source, target)
            except OSError:
                target.write_bytes(source.read_bytes())
        uris.append(f"file://{target}")
    return uris


def upscaled_photos(folder: Path) -> list[Path]:
    """The sample photos at 12 MP (portrait ones stay portrait), JPEG quality 92."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for source in sorted(SAMPLE_PHOTOS.glob("*.jpg")):
        target = folder / source.name
        if not target.exists():
            with Image.open(source) as image:
                size = (LARGE[1], LARGE[0]) if image.width >= image.height else (LARGE[0], LARGE[1])
                image.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(target, quality=92)
        paths.append(target)
    return paths


# --- CPU decoding in worker processes ----------------------------------------------------------------------


def prepare_to_shared_memory(uris: list[str], min_size: int, max_size: int) -> str:
    """A worker's task: the job's CPU stage on ``uris``, written as an Arrow IPC file in shared memory."""
    table = prepare_images(pa.table({"uri": uris}), min_size=min_size, max_size=max_size)
    path = str(SHM / f"detr-bench-{uuid.uuid4().hex}.arrow")
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def read_shared(path: str) -> pa.Table:
    """The batch a worker wrote, memory-mapped (no copy); the file is unlinked (the mapping stays)."""
    table = pa.ipc.open_file(pa.memory_map(path)).read_all()
    os.unlink(path)
    return table


def stream_prepared(pool, uris: list[str], args: argparse.Namespace, window: int):
    """Prepared batches in order, at most ``window`` batches decoded ahead (the job caps its queue too)."""
    chunks = [uris[i : i + args.batch_size] for i in range(0, len(uris), args.batch_size)]
    pending: collections.deque = collections.deque()
    for chunk in chunks[:window]:
        pending.append(pool.apply_async(prepare_to_shared_memory, (chunk, args.min_size, args.max_size)))
    next_chunk = window
    while pending:
        path = pending.popleft().get()
        if next_chunk < len(chunks):
            pending.append(
                pool.apply_async(prepare_to_shared_memory, (chunks[next_chunk], args.min_size, args.max_size))
            )
            next_chunk += 1
        yield read_shared(path)


def timed_stream(batches, consume) -> tuple[float, int, float]:
    """(images per second after the first batch, images, seconds to the first batch) of consuming a stream."""
    started = time.perf_counter()
    first_done = None
    images = after_first = 0
    for batch in batches:
        consume(batch)
        images += batch.num_rows
        if first_done is None:
            first_done = time.perf_counter()
        else:
            after_first += batch.num_rows
    elapsed = time.perf_counter() - (first_done or started)
    return (after_first / elapsed if elapsed > 0 and after_first else float("nan")), images, (first_done or 0) - started


# --- the model stage on pre-decoded images -----------------------------------------------------------------


class Uint8UploadDetector(Detector):
    """The Detector with ``collate_on``: uint8 images to the device, normalized and padded there."""

    def detect(self, resized, original_sizes):
        batch = collate_on(self.device, resized, original_sizes)
        with torch.inference_mode(), self._autocast():
            outputs = self.model(batch.pixel_values, batch.pixel_mask)
            results = detr.postprocess(outputs, batch.original_sizes, self.config.threshold)
        return [detr.detection_records(result, self.model.categories) for result in results]


def repeated(table: pa.Table, rows: int) -> pa.Table:
    """``table``'s rows repeated to ``rows`` rows (the buffers are shared, not copied)."""
    return pa.concat_tables([table] * (rows // table.num_rows + 1)).slice(0, rows)


def detector_rate(detector: Detector, prepared: pa.Table, batch_size: int, repeats: int) -> float:
    """Images per second of the Detector over ``prepared``, median of ``repeats`` passes after a warm-up pass
    (every batch shape once: cuDNN and oneDNN set up each new shape on its first call)."""
    rates = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        for start in range(0, prepared.num_rows, batch_size):
            detector(prepared.slice(start, batch_size))
        rates.append(prepared.num_rows / (time.perf_counter() - started))
    return statistics.median(rates[1:])


def forward_rate(detector: Detector, prepared: pa.Table, batch_size: int, repeats: int) -> float:
    """Images per second of the bare model on batches normalized, padded and on the device beforehand."""
    rows = prepared.slice(0, batch_size * 8).to_pylist()
    images = [
        torch.frombuffer(bytearray(r["pixels"]), dtype=torch.uint8).reshape(3, r["resized_height"], r["resized_width"])
        for r in rows
    ]
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = list(range(start, min(start + batch_size, len(rows))))
        for group in aspect_groups([tuple(images[i].shape[1:]) for i in chunk]):  # as the Detector batches
            batch = collate_on(detector.device, [images[chunk[g]] for g in group], [(1, 1)] * len(group))
            batches.append((batch.pixel_values, batch.pixel_mask))
    with torch.inference_mode(), detector._autocast():
        rates = []
        for _ in range(repeats + 1):  # the first pass warms up every batch shape
            _sync(detector.device)
            started = time.perf_counter()
            for pixel_values, pixel_mask in batches:
                detector.model(pixel_values, pixel_mask)
            _sync(detector.device)
            rates.append(len(rows) / (time.perf_counter() - started))
    return statistics.median(rates[1:])


# --- 5. GPU decoding (benchmarks/gpu_jpeg.py) --------------------------------------------------------------


def gpu_decode_rate(detector: Detector, uris: list[str], args: argparse.Namespace) -> tuple[float, list[list[dict]]]:
    """Images per second of read -> nvJPEG -> resize -> model -> rows, and the detections of each image."""
    from gpu_jpeg import decode_resized_jpegs

    paths = [uri.removeprefix("file://") for uri in uris]
    chunks = [paths[i : i + args.batch_size] for i in range(0, len(paths), args.batch_size)]

    def read(chunk: list[str]) -> list[bytes]:
        return [Path(path).read_bytes() for path in chunk]

    detections: list[list[dict]] = []

    def run(objects: list[bytes]) -> None:
        decoded = decode_resized_jpegs(objects, detector.device, args.min_size, args.max_size)
        ok = [d for d in decoded if not isinstance(d, Exception)]
        found: list[list[dict]] = [[] for _ in ok]
        for group in aspect_groups([tuple(image.shape[1:]) for image, _ in ok]):
            batch = collate_on(detector.device, [ok[g][0] for g in group], [ok[g][1] for g in group])
            with torch.inference_mode(), detector._autocast():
                outputs = detector.model(batch.pixel_values, batch.pixel_mask)
                results = detr.postprocess(outputs, batch.original_sizes, detector.config.threshold)
            for g, result in zip(group, results):
                found[g] = detr.detection_records(result, detector.model.categories)
        detections.extend(found)

    run(read(chunks[0]))  # warm-up (nvJPEG handles, kernels)
    detections.clear()
    with ThreadPoolExecutor(1) as reader:
        started = time.perf_counter()
        ahead = reader.submit(read, chunks[0])
        for i in range(len(chunks)):
            objects = ahead.result()
            if i + 1 < len(chunks):
                ahead = reader.submit(read, chunks[i + 1])
            run(objects)
        _sync(detector.device)
        elapsed = time.perf_counter() - started
    return len(paths) / elapsed, detections


def compare_detections(a: list[list[dict]], b: list[list[dict]], threshold: float) -> str:
    """How far two runs' detections of the same images are apart (count, scores, boxes)."""
    counts = sum(len(x) for x in a), sum(len(y) for y in b)
    score, box = [], []
    for x, y in zip(a, b):
        for want in x:
            same = [d for d in y if d["category_id"] == want["category_id"]]
            if not same:
                continue
            best = min(same, key=lambda d: np.abs(np.subtract(d["box"], want["box"])).max())
            score.append(abs(best["score"] - want["score"]))
            box.append(float(np.abs(np.subtract(best["box"], want["box"])).max()))
    if not score:
        return f"detections {counts[0]} vs {counts[1]} (threshold {threshold}), none to compare"
    return (
        f"detections {counts[0]} vs {counts[1]} (threshold {threshold}); matched by category and nearest box: "
        f"score diff median {np.median(score):.1e} max {max(score):.1e}, "
        f"box diff median {np.median(box):.2f} px, 99th percentile {np.percentile(box, 99):.2f} px"
    )


# --- 6. the real job ---------------------------------------------------------------------------------------


def run_job(folder: Path, output: Path, weights: str, args: argparse.Namespace) -> tuple[int, float]:
    """(images, seconds by the job's own summary) of ``python -m jobs.annotate`` on ``folder``."""
    command = [sys.executable, "-m", "jobs.annotate", str(folder), str(output), "--weights", weights]
    command += [
        "--min-size",
        str(args.min_size),
        "--max-size",
        str(args.max_size),
        "--batch-size",
        str(args.batch_size),
    ]
    command += ["--precision", args.precision]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local cluster every run
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"annotate failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")
    summary = next(line for line in done.stdout.splitlines() if line.startswith("annotate: "))
    rows = sum(pq.read_metadata(p).num_rows for p in output.glob("*.parquet"))
    return rows, float(summary.split(" over ")[1].split(" s")[0])


# --- the run -----------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    args.batch_size = args.batch_size or (GPU_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE)
    args.workers = args.workers or max(1, _cores() - 1)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-annotate-gpu-"))
    # The pool first: its processes are spawned (a forked CUDA context is unusable) and warm before timing.
    pool = None if args.job_only else multiprocessing.get_context("spawn").Pool(args.workers)
    weights = write_decisive_checkpoint(str(work / "detr-r50-random.pth"), detr.DetrConfig())
    sets = {"COCO-sized": sorted(SAMPLE_PHOTOS.glob("*.jpg"))}
    if args.large_images and not args.job_only:
        sets["12 MP"] = upscaled_photos(work / "large-sources")
    counts = {"COCO-sized": args.images, "12 MP": args.large_images}
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or platform.machine()}"
    print(
        f"device: {name}; {_cores()} cores, {args.workers} decoding processes; torch {torch.__version__}; "
        f"DETR-R50 {args.precision}, batch {args.batch_size}, resize {args.min_size}/{args.max_size}; "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    if pool is not None:  # warm the workers (imports) on one batch before anything is timed
        for _ in stream_prepared(pool, make_folder(work / "warm", sets["COCO-sized"], 2), args, 1):
            pass
    config = DetectorConfig(weights=weights, threshold=0.7, precision=args.precision, use_gpu=device.type == "cuda")
    detector, uint8_detector = Detector(config), Uint8UploadDetector(config)
    rows = []
    for set_name, sources in sets.items():
        uris = make_folder(work / set_name.replace(" ", "-"), sources, counts[set_name])
        distinct = prepare_images(
            pa.table({"uri": uris[: len(sources)]}), min_size=args.min_size, max_size=args.max_size
        )
        prepared = repeated(distinct, min(len(uris), 16 * args.batch_size))
        figures = {
            "model forward": forward_rate(detector, prepared, args.batch_size, args.repeats),
            "Detector, prepared": detector_rate(detector, prepared, args.batch_size, args.repeats),
        }
        line, images, first = "", len(uris), 0.0
        if pool is not None:
            figures["Detector, prepared, uint8 upload"] = detector_rate(
                uint8_detector, prepared, args.batch_size, args.repeats
            )
            window = 2 * args.workers
            figures["decode only"], _, _ = timed_stream(stream_prepared(pool, uris, args, window), lambda table: None)
            cpu_detections: list[list[dict]] = []

            def consume(table: pa.Table, keep=cpu_detections) -> None:
                keep.extend(row["detections"] for row in detector(table).to_pylist())

            figures["pipeline"], images, first = timed_stream(stream_prepared(pool, uris, args, window), consume)
            figures["pipeline, uint8 upload"], _, _ = timed_stream(
                stream_prepared(pool, uris, args, window), uint8_detector
            )
            if args.gpu_decode:
                try:
                    figures["GPU decode + model"], gpu_detections = gpu_decode_rate(detector, uris, args)
                    line = compare_detections(cpu_detections, gpu_detections, config.threshold)
                except Exception as error:  # noqa: BLE001 - reported, the other figures stand
                    line = f"GPU decode failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
        rows.append((set_name, figures))
        _print_set(set_name, images, figures, first, line)
    if pool is not None:
        pool.close()
        pool.join()
    if args.job or args.job_only:
        _run_jobs(work, weights, sets["COCO-sized"], args, rows[0][1])
    columns = [
        "model forward",
        "Detector, prepared",
        "Detector, prepared, uint8 upload",
        "pipeline",
        "pipeline, uint8 upload",
        "decode only",
        "GPU decode + model",
    ]
    print(f"| photos, img/s | {' | '.join(columns)} | pipeline / Detector (goal >= 0.9) |")
    print("|---" * (len(columns) + 2) + "|")
    for set_name, figures in rows:
        cells = [f"{figures[c]:.1f}" if c in figures else "-" for c in columns]
        ratio = f"{figures['pipeline'] / figures['Detector, prepared']:.2f}" if "pipeline" in figures else "-"
        print(f"| {set_name} | {' | '.join(cells)} | {ratio} |")
    if args.work_dir is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def _print_set(set_name: str, images: int, figures: dict[str, float], first: float, line: str) -> None:
    print(f"{set_name}: {images} images; first pipeline batch after {first:.1f} s (not timed)")
    for figure, rate in figures.items():
        print(f"  {figure}: {rate:.1f} img/s")
    if line:
        print(f"  GPU vs CPU decoding: {line}")
    print(flush=True)


def _run_jobs(work: Path, weights: str, sources: list[Path], args: argparse.Namespace, peer: dict) -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        print("the real job: skipped, Ray is not installed here\n")
        return
    small = work / "job-n"
    large = work / "job-kn"
    make_folder(small, sources, args.images)
    make_folder(large, sources, args.images * args.job_scale)
    n, seconds_n = run_job(small, work / "out-n", weights, args)
    kn, seconds_kn = run_job(large, work / "out-kn", weights, args)
    steady = (kn - n) / (seconds_kn - seconds_n)
    print(
        f"the real job (python -m jobs.annotate, local Ray): {n} images in {seconds_n:.1f} s, {kn} in "
        f"{seconds_kn:.1f} s; steady state {steady:.1f} img/s; "
        f"vs Detector, prepared: {steady / peer['Detector, prepared']:.2f}\n"
    )


if __name__ == "__main__":
    main(parse_args())
