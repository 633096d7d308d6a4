"""Model speed: detr (ours) against transformers' DetrForObjectDetection, same weights and inputs.

    python benchmarks/bench_model.py                     # CPU fp32, 800x1066, batch 1 and 4
    python benchmarks/bench_model.py --batch-sizes 1 8 32 --device cuda --dtype bf16
    python benchmarks/bench_model.py --threads 1 --batch-sizes 1 --repeats 3   # as one CPU annotate actor
    python benchmarks/bench_model.py --device cuda --dtype bf16 --batch-sizes 1 8 32 \
        --compile none default reduce-overhead --measure-peak     # GPU: eager, compiled, CUDA graphs

Both models get the same random weights (written by transformers' save_pretrained, loaded by
detr.from_pretrained) and the same inputs. Ours is the model ``detr.from_pretrained`` returns,
as the README's example uses it: no other call. Timings alternate between the two models so that
load from other processes hits both alike; the median of the repeats is reported.

``--compile MODE ...`` adds rows for ``torch.compile(model, mode=MODE)`` of both models (``none``: eager;
``reduce-overhead`` replays CUDA graphs); a model that fails to compile gets "failed" in its cell. The
floating-point operations per image are counted once, with ``torch.utils.flop_counter.FlopCounterMode``
on our model at the input size (on the meta device, attention through its matmul form so that it is
counted too); each row gives our achieved TFLOP/s and, with ``--measure-peak`` (a bf16 8192^3 matrix
product on random data, timed here) or ``--peak-tflops``, the fraction of that peak.
"""

from __future__ import annotations

import argparse
import copy
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
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
ISSUE_GFLOP_ESTIMATE = 157  # issue 14's figure for an 800x1066 image (convolutions and linear layers)


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
    parser.add_argument(
        "--compile",
        nargs="+",
        choices=COMPILE_MODES,
        default=["none"],
        help="torch.compile modes to time, each for both models (none: eager)",
    )
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed calls per compiled model and batch (compiles, records graphs)"
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="the device's peak for --dtype, for the %% column"
    )
    parser.add_argument(
        "--measure-peak", action="store_true", help="time a --dtype matrix product here and use it as the peak"
    )
    return parser.parse_args(argv)


def flops_per_image(model: torch.nn.Module, height: int, width: int) -> float:
    """Floating-point operations of one forward pass on one height x width image (a multiply-add is 2).

    Counted on a copy of ``model`` on the meta device (no arithmetic is done), with attention through
    its matmul form: FlopCounterMode has no formula for some fused attention kernels (the CPU ones).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(model).to("meta").requires_grad_(False)  # the module tracker needs no grads
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        meta(
            torch.zeros(1, 3, height, width, device="meta"),
            torch.ones(1, height, width, dtype=torch.bool, device="meta"),
        )
    return float(counter.get_total_flops())


def measure_peak_tflops(device: str, dtype: torch.dtype) -> float:
    """TFLOP/s of a square matrix product on random data: 8192 on CUDA, 2048 elsewhere; median of 10."""
    n = 8192 if device == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    times = [_time(lambda: a @ b, device) for _ in range(10)]
    return 2 * n**3 / statistics.median(times) / 1e12


def compiled(model: torch.nn.Module, mode: str):
    """``model`` under torch.compile ``mode`` (the model itself for ``none``)."""
    if mode == "none":
        return model
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)


def _cell(value: float | None, missing: str = "failed", spec: str = ".2f") -> str:
    return missing if value is None else format(value, spec)


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"[:160]


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
    flops = flops_per_image(ours, args.height, args.width)
    reference, ours = reference.to(device), ours.to(device)
    name = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    print(f"device: {name}; torch {torch.__version__}; input {args.height}x{args.width}; {args.dtype}")
    print(f"load average at the start: {os.getloadavg()[0]:.1f}")
    print(
        f"work per image: {flops / 1e9:.1f} GFLOP (FlopCounterMode on our model at {args.height}x{args.width}; "
        f"issue 14 estimated {ISSUE_GFLOP_ESTIMATE} at 800x1066)"
    )
    peak = args.peak_tflops
    if args.measure_peak:
        peak = measure_peak_tflops(device, dtype)
    if peak:
        source = "measured here: square matrix product, random data" if args.measure_peak else "--peak-tflops"
        print(f"peak: {peak:.1f} TFLOP/s {args.dtype} ({source}); at that rate {peak * 1e12 / flops:.0f} img/s")
    if any(mode != "none" for mode in args.compile):
        # One compiled graph per (model, mode, batch size): more than dynamo's default cache allows per function.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    print(
        "| batch | transformers img/s | detr-ray img/s | ratio | max |logit diff| (relative) | max |box diff| "
        "| compile | detr-ray TFLOP/s | % of peak |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in args.compile:
        ref_model, our_model = compiled(reference, mode), compiled(ours, mode)
        failed: dict[str, str] = {}
        for batch in args.batch_sizes:
            x = torch.randn(batch, 3, args.height, args.width, device=device)
            mask = torch.ones(batch, args.height, args.width, dtype=torch.bool, device=device)
            mask[0, :, args.width * 3 // 4 :] = False  # some padding, as in a real batch
            calls = {
                "transformers": lambda x=x, mask=mask, m=ref_model: m(pixel_values=x, pixel_mask=mask.long()),
                "detr-ray": lambda x=x, mask=mask, m=our_model: m(x, mask),
            }
            outputs = {}
            autocast = torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)
            with torch.inference_mode(), autocast:
                for model_name, call in calls.items():
                    if model_name in failed:
                        continue
                    try:
                        for _ in range(args.warmup if mode != "none" else 1):
                            out = call()
                    except Exception as error:  # noqa: BLE001 - a model that does not compile gets "failed"
                        failed[model_name] = _one_line(error)
                        print(f"{model_name}, compile {mode}: failed: {failed[model_name]}", file=sys.stderr)
                        continue
                    logits = out.logits if model_name == "transformers" else out["pred_logits"]
                    boxes = out.pred_boxes if model_name == "transformers" else out["pred_boxes"]
                    # Copies: a CUDA graph's next replay overwrites its outputs.
                    outputs[model_name] = (logits.float().clone(), boxes.float().clone())
                times: dict[str, list[float]] = {model_name: [] for model_name in outputs}
                for _ in range(args.repeats):
                    for model_name in outputs:
                        times[model_name].append(_time(calls[model_name], device))
            rates = {model_name: batch / statistics.median(t) for model_name, t in times.items()}
            ref_ips, our_ips = rates.get("transformers"), rates.get("detr-ray")
            if len(outputs) == 2:
                (ref_logits, ref_boxes), (our_logits, our_boxes) = outputs["transformers"], outputs["detr-ray"]
                logit_diff = (ref_logits - our_logits).abs().max().item()
                relative = logit_diff / ref_logits.abs().max().item()
                diffs = f"{logit_diff:.1e} ({relative:.1e}) | {(ref_boxes - our_boxes).abs().max().item():.1e}"
            else:
                diffs = "- | -"
            tflops = our_ips * flops / 1e12 if our_ips else None
            ratio = f"{our_ips / ref_ips:.2f}x" if ref_ips and our_ips else "-"
            share = f"{100 * tflops / peak:.1f}%" if tflops and peak else "-"
            print(
                f"| {batch} | {_cell(ref_ips)} | {_cell(our_ips)} | {ratio} | {diffs} | {mode} "
                f"| {_cell(tflops, '-', '.1f')} | {share} |",
                flush=True,
            )
        del ref_model, our_model
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main(parse_args())
