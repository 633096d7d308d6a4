"""Training-step speed: detr + SetCriterion (ours) against transformers' DetrForObjectDetection with its loss.

    python benchmarks/bench_finetune.py                           # CPU, R50, 512x512 + 512x384 padded, batch 2
    python benchmarks/bench_finetune.py --device cuda --batch-size 8 --image-size 800

One step = zero_grad, forward, loss (Hungarian matching for the last and every auxiliary decoder
layer), backward, gradient clipping at 0.1 and an AdamW step - what jobs/finetune/engine.py does
per batch, with its optimizer (fused AdamW); transformers steps with torch's default AdamW, as its
users write it, and once more in channels-last with fused AdamW. Both models get the same random
weights (transformers' save_pretrained, read back by detr.from_pretrained), the same configuration
(aux losses, eos 0.1, loss/cost weights 1/5/2, no dropout, stem + layer1 frozen as in DETR) and the
same inputs; the first step's losses are
compared to show the two compute the same thing. Timings alternate between the two models so
that load from other processes hits both alike; medians of wall and process CPU time are
reported (with one torch thread the CPU time does not depend on other processes' load).
The matcher's share is the time spent in our HungarianMatcher calls over our step time.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import detr  # noqa: E402
from detr.criterion import weighted_total  # noqa: E402
from jobs.finetune.engine import DetectionBatch, build_model, build_optimizer, train_one_epoch  # noqa: E402
from jobs.finetune.settings import FinetuneConfig  # noqa: E402

from checkpoints import reference_model, write_hub_layout  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=512, help="the larger image is N x N, the other N x 3N/4")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--objects", type=int, default=6, help="target boxes per image")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    parser.add_argument("--steps", type=int, default=2, help="steps per model and round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = a Ray Train worker with 1 CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="autocast dtype of the forward pass, for both models (bf16: our --precision bf16)",
    )
    return parser.parse_args(argv)


class TimedMatcher(nn.Module):
    """Our HungarianMatcher, adding up the wall time of its calls."""

    def __init__(self, matcher: detr.HungarianMatcher, device: str) -> None:
        super().__init__()
        self.matcher, self.device, self.seconds = matcher, device, 0.0

    def forward(self, outputs, targets):
        _sync(self.device)
        start = time.perf_counter()
        indices = self.matcher(outputs, targets)
        self.seconds += time.perf_counter() - start
        return indices


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def freeze_like_detr(model: nn.Module) -> None:
    """transformers trains the whole backbone; DETR (and ours) freezes the stem and layer1."""
    for name, parameter in model.named_parameters():
        if "backbone" in name and not any(f"layer{i}" in name for i in (2, 3, 4)):
            parameter.requires_grad_(False)


def optimizer_for(model: nn.Module, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW as a transformers user writes it (torch's default implementation unless ``fused``)."""
    backbone = [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]
    groups = [{"params": rest, "lr": 1e-4}, {"params": backbone, "lr": 1e-5}]
    return torch.optim.AdamW(groups, weight_decay=1e-4, fused=fused)


def make_batch(args: argparse.Namespace, device: str):
    generator = torch.Generator().manual_seed(0)
    n = args.image_size
    pixel_values = torch.randn(args.batch_size, 3, n, n, generator=generator)
    pixel_mask = torch.ones(args.batch_size, n, n, dtype=torch.bool)
    pixel_mask[1::2, :, n * 3 // 4 :] = False  # every other image is N x 3N/4, padded as in a real batch
    pixel_values[~pixel_mask[:, None].expand_as(pixel_values)] = 0
    targets = []
    for _ in range(args.batch_size):
        centres = torch.rand(args.objects, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(args.objects, 2, generator=generator) * 0.3 + 0.05
        labels = torch.randint(1, 91, (args.objects,), generator=generator)
        targets.append({"labels": labels.to(device), "boxes": torch.cat([centres, sizes], 1).to(device)})
    return pixel_values.to(device), pixel_mask.to(device), targets


def reference_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, pixel_values, pixel_mask, labels, autocast
) -> float:
    """transformers' training step as its documentation writes it: the loss comes from ``labels=``."""
    optimizer.zero_grad(set_to_none=True)
    with autocast:
        loss = model(pixel_values=pixel_values, pixel_mask=pixel_mask.long(), labels=labels).loss
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    optimizer.step()
    return loss.item()


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    reference = reference_model(seed=0, auxiliary_loss=True, dropout=0.0).to(device).train()
    freeze_like_detr(reference)
    with tempfile.TemporaryDirectory() as folder:
        loaded = detr.from_pretrained(str(write_hub_layout(reference, Path(folder))))
    config = dataclasses.replace(loaded.config, dropout=0.0)
    # Our model as the finetune worker builds it, and one step = its train_one_epoch over one batch.
    settings = FinetuneConfig("unused", "unused", "unused")
    ours, criterion = build_model(settings, config, loaded.categories, loaded.state_dict())
    ours, criterion = ours.to(device), criterion.to(device)
    matcher = criterion.matcher = TimedMatcher(criterion.matcher, args.device)
    pixel_values, pixel_mask, targets = make_batch(args, args.device)
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    reference_cl = copy.deepcopy(reference).to(memory_format=torch.channels_last)
    pixel_values_cl = pixel_values.contiguous(memory_format=torch.channels_last)
    # Ours steps with the job's optimizer (fused AdamW); the last peer row gets every non-model speed-up
    # ours has (channels-last, fused AdamW), to show what is left for the model code itself.
    optimizers = {
        "ours": build_optimizer(ours, settings),
        "transformers": optimizer_for(reference),
        "transformers, channels-last + fused AdamW": optimizer_for(reference_cl, fused=True),
    }
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    steps = {
        "ours": lambda: train_one_epoch(
            ours,
            criterion,
            [DetectionBatch(pixel_values, pixel_mask, targets, (), len(targets))],
            optimizers["ours"],
            settings,
            device,
            epoch=0,
            step=0,
            autocast=autocast,
        )[0]["loss"],
        "transformers": lambda: reference_step(
            reference, optimizers["transformers"], pixel_values, pixel_mask, labels, autocast
        ),
        "transformers, channels-last + fused AdamW": lambda: reference_step(
            reference_cl,
            optimizers["transformers, channels-last + fused AdamW"],
            pixel_values_cl,
            pixel_mask,
            labels,
            autocast,
        ),
    }
    # Same function check: without aux losses both give the same loss (transformers 5.x with auxiliary_loss=True
    # feeds layer-normed states from layer to layer, unlike DETR, so its aux-loss outputs differ slightly).
    with torch.no_grad():
        reference.config.auxiliary_loss = False
        hf_loss = reference(pixel_values=pixel_values, pixel_mask=pixel_mask.long(), labels=labels).loss.item()
        reference.config.auxiliary_loss = True
        outputs = ours(pixel_values, pixel_mask)
        our_loss = weighted_total(criterion({k: outputs[k] for k in ("pred_logits", "pred_boxes")}, targets)).item()
    for run in steps.values():  # warm-up
        run()
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    matcher_seconds = []
    for _ in range(args.rounds):
        for name, run in steps.items():
            for _ in range(args.steps):
                matcher.seconds = 0.0
                _sync(args.device)
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                run()
                _sync(args.device)
                wall[name].append(time.perf_counter() - start_wall)
                cpu[name].append(time.process_time() - start_cpu)
                if name == "ours":
                    matcher_seconds.append(matcher.seconds)

    where = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU"
    )
    print(
        f"device: {where}, {torch.get_num_threads()} torch thread(s), {os.cpu_count()} CPUs, load avg "
        f"{os.getloadavg()[0]:.1f}; torch {torch.__version__}; DETR-R50 {args.precision}, batch {args.batch_size} of "
        f"{args.image_size}x{args.image_size} (every other padded from {args.image_size}x{args.image_size * 3 // 4}), "
        f"{args.objects} targets each, 6 decoder layers with aux losses; {args.rounds}x{args.steps} steps each"
    )
    print(f"loss without aux terms, same weights and batch: ours {our_loss:.6f}, transformers {hf_loss:.6f}")
    print(
        "| model | step wall s (median) | img/s per worker (wall) | step CPU s (median) | img per CPU-second "
        "| ours vs this (CPU time) |"
    )
    print("|---|---|---|---|---|---|")
    ours_cpu = statistics.median(cpu["ours"])
    for name in steps:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(
            f"| {name} | {w:.3f} | {args.batch_size / w:.3f} | {c:.3f} | {args.batch_size / c:.3f} "
            f"| {c / ours_cpu:.2f}x |"
        )
    wall_ratio = statistics.median(wall["transformers"]) / statistics.median(wall["ours"])
    share = statistics.median(m / w for m, w in zip(matcher_seconds, wall["ours"]))
    print(
        f"speed-up ours vs transformers as documented: {wall_ratio:.2f}x wall, "
        f"{statistics.median(cpu['transformers']) / ours_cpu:.2f}x CPU time (goal >= 1.2x)"
    )
    print(
        f"matcher share of our step: {share:.1%} ({statistics.median(matcher_seconds) * 1000:.0f} ms of "
        f"{statistics.median(wall['ours']) * 1000:.0f} ms, 6 matchings per step)"
    )


if __name__ == "__main__":
    main(parse_args())
