"""Model speed: detr (ours) against transformers' DetrForObjectDetection, same weights and inputs.

    python benchmarks/bench_model.py                     # CPU fp32, 800x1066, batch 1 and 4
    python benchmarks/bench_model.py --batch-sizes 1 8 32 --device cuda --dtype bf16
    python benchmarks/bench_model.py --threads 1 --batch-sizes 1 --repeats 3   # as one CPU annotate actor

Both models get the same random weights (written by transformers' save_pretrained, loaded by
detr.from_pretrained) and the same inputs. Ours is the model ``detr.from_pretrained`` returns,
as the README's example uses it: no other call. Timings alternate between the two models so that
load from other processes hits both alike; the median of the repeats is reported, with the
largest logit difference relative to the largest logit.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import detr  # noqa: E402

from checkpoints import reference_model, write_hub_layout  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1066)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="autocast dtype (fp32: none)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads on CPU (default: torch's; 1 = an annotate actor with 1 CPU)",
    )
    return parser.parse_args(argv)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def main(args: argparse.Namespace) -> None:
    device, dtype = args.device, DTYPES[args.dtype]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    reference = reference_model(seed=0)
    with tempfile.TemporaryDirectory() as folder:
        ours = detr.from_pretrained(str(write_hub_layout(reference, Path(folder))))
    reference, ours = reference.to(device), ours.to(device)
    name = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    print(f"device: {name}; torch {torch.__version__}; input {args.height}x{args.width}; {args.dtype}")
    print(f"load average at the start: {os.getloadavg()[0]:.1f}")
    print("| batch | transformers img/s | detr-ray img/s | ratio | max logit diff (relative) | max box diff |")
    print("|---|---|---|---|---|---|")
    for batch in args.batch_sizes:
        x = torch.randn(batch, 3, args.height, args.width, device=device)
        mask = torch.ones(batch, args.height, args.width, dtype=torch.bool, device=device)
        mask[0, :, args.width * 3 // 4 :] = False  # some padding, as in a real batch
        autocast = torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)
        with torch.inference_mode(), autocast:
            run_ref = lambda x=x, mask=mask: reference(pixel_values=x, pixel_mask=mask.long())  # noqa: E731
            run_ours = lambda x=x, mask=mask: ours(x, mask)  # noqa: E731
            expected, got = run_ref(), run_ours()  # also the warm-up
            logit_diff = (expected.logits.float() - got["pred_logits"].float()).abs().max().item()
            relative = logit_diff / expected.logits.float().abs().max().item()
            box_diff = (expected.pred_boxes.float() - got["pred_boxes"].float()).abs().max().item()
            times_ref, times_ours = [], []
            for _ in range(args.repeats):
                times_ref.append(_time(run_ref, device))
                times_ours.append(_time(run_ours, device))
        ref_ips = batch / statistics.median(times_ref)
        our_ips = batch / statistics.median(times_ours)
        print(
            f"| {batch} | {ref_ips:.2f} | {our_ips:.2f} | {our_ips / ref_ips:.2f}x "
            f"| {logit_diff:.1e} ({relative:.1e}) | {box_diff:.1e} |"
        )
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main(parse_args())
