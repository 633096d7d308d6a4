"""Decode + resize speed of annotate's CPU stage, per core, against a full decode and transformers' processor.

    python benchmarks/bench_decode.py [--min-size 800] [--max-size 1333] [--repeats 5]

For each source size (a 640x480 COCO photo as stored, and the same photo upscaled to 12 and
24 megapixels and re-encoded as JPEG quality 92, like a phone or camera picture) it times, in
one process with one thread:

* ``decode_resized``: what the annotate job runs (``detr.image_decoding``): a JPEG that
  shrinks to half or less is decoded at libjpeg's reduced scale, then resized by DETR's rule;
* the same with ``reduced_jpeg=False`` (``--full-jpeg-decode``): every pixel decoded first;
* transformers' ``DetrImageProcessor`` (resize only, ``do_normalize=False`` and no padding,
  so it does the same work) on a full PIL decode: the peer;
* ``decode_resized`` in a :class:`jobs.annotate.decoder_process.DecoderProcess` (what a retried
  decode task does: bytes to a child process, resized pixels back through a pipe), against the
  same call in this process, in CPU time of both processes (``--cpu-images`` decodes each), which
  load from other work on the machine does not inflate.

It also prints the mean absolute difference (0-255 scale) between the reduced and the full
path's resized pixels. Medians of the repeats.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from detr.image_decoding import decode_resized  # noqa: E402
from jobs.annotate.decoder_process import DecoderProcess  # noqa: E402
from jobs.annotate.decoding import DecodeSettings, decode_object  # noqa: E402

COCO_PHOTO = ROOT.parent / "shared" / "data" / "coco-mini" / "val2017" / "000000000139.jpg"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-size", type=int, default=800)
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu-images", type=int, default=40)
    return parser.parse_args(argv)


def source_photo() -> Image.Image:
    if COCO_PHOTO.is_file():
        return Image.open(COCO_PHOTO).convert("RGB")
    rng = np.random.default_rng(0)  # without ../shared: smooth gradients plus noise, 640x480
    y, x = np.mgrid[0:480, 0:640]
    base = np.stack([x * 255 / 640, y * 255 / 480, (x + y) * 127 / 1120], axis=2) + rng.normal(0, 8, (480, 640, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def jpeg(image: Image.Image, size: tuple[int, int] | None) -> bytes:
    buffer = io.BytesIO()
    (image.resize(size, Image.BICUBIC) if size else image).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) of this process, or of process ``pid`` (Linux /proc)."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_per_image(run, count: int, child_pid: int | None = None) -> float:
    run()  # warm-up
    start = cpu_seconds() + (cpu_seconds(child_pid) if child_pid else 0.0)
    for _ in range(count):
        run()
    return (cpu_seconds() + (cpu_seconds(child_pid) if child_pid else 0.0) - start) / count


def main(args: argparse.Namespace) -> None:
    from transformers import DetrImageProcessor

    torch.set_num_threads(1)
    processor = DetrImageProcessor(
        size={"shortest_edge": args.min_size, "longest_edge": args.max_size},
        do_normalize=False,
        do_rescale=False,
        do_pad=False,
    )
    photo = source_photo()
    print(
        f"{'COCO photo' if COCO_PHOTO.is_file() else 'synthetic photo'}; resize to {args.min_size}/{args.max_size}; "
        f"1 thread; medians of {args.repeats}"
    )
    print(
        "| source | ours (reduced JPEG decode) img/s | ours, --full-jpeg-decode img/s | DetrImageProcessor img/s "
        "| ours vs processor | mean abs pixel difference reduced vs full | CPU ms/img in process "
        "| CPU ms/img in a child process (both processes) | child vs in process |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    settings = DecodeSettings(args.min_size, args.max_size)
    child = DecoderProcess(decode_object, settings)
    for label, size in (
        ("640x480 (as stored)", None),
        ("4032x3024 (12 MP)", (4032, 3024)),
        ("5712x4284 (24 MP)", (5712, 4284)),
    ):
        data = jpeg(photo, size) if size else COCO_PHOTO.read_bytes() if COCO_PHOTO.is_file() else jpeg(photo, None)

        def ours(reduced: bool, data: bytes = data):
            return decode_resized(data, min_size=args.min_size, max_size=args.max_size, reduced_jpeg=reduced)[0]

        def peer(data: bytes = data):
            return processor(Image.open(io.BytesIO(data)).convert("RGB"), return_tensors="np")

        reduced = median_seconds(lambda: ours(True), args.repeats)
        full = median_seconds(lambda: ours(False), args.repeats)
        reference = median_seconds(peer, args.repeats)
        difference = (ours(True).float() - ours(False).float()).abs().mean().item()
        in_process = cpu_per_image(lambda data=data: decode_object("bench", data, settings), args.cpu_images)
        isolated = cpu_per_image(lambda data=data: child.decode("bench", data), args.cpu_images, child.pid)
        print(
            f"| {label} | {1 / reduced:.1f} | {1 / full:.1f} | {1 / reference:.1f} | {reference / reduced:.2f}x "
            f"| {difference:.2f} | {in_process * 1e3:.1f} | {isolated * 1e3:.1f} | {isolated / in_process:.2f}x |"
        )
    child.close()


if __name__ == "__main__":
    main(parse_args())
