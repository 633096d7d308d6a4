"""Where the annotate job's model actors go: how many, with how many CPUs, threads and GPUs, and batch size.

:func:`plan_actors` works the defaults out from the cluster's nodes (``ray.nodes()``) and refuses
layouts that could only stall - more GPUs per actor than any node has, actors that leave no CPU
for reading and decoding - unless ``--wait-for-gpus`` says the autoscaler will add GPU nodes,
in which case the job bounds the wait instead.

On a CPU-only cluster the model actor reserves all CPUs of the largest node but one, so that
Ray can schedule the decode and write tasks on the one left, and runs torch on all of the
node's cores: decoding takes ~3-25 ms of one core per image and DETR on CPU ~1 s of every core
(benchmarks/RESULTS.md), so a core kept for decoding alone would sit idle most of the time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from jobs.annotate.settings import CPU_BATCH_SIZE, GPU_BATCH_SIZE, AnnotateConfig
from jobs.cli import UserError


class ActorPlanError(UserError):
    """A layout the cluster cannot run: one line for the user."""


@dataclass(frozen=True)
class ActorPlan:
    """How the model stage is laid out on the cluster."""

    min_actors: int
    max_actors: int
    cpus_per_actor: float  # Ray's logical CPUs reserved per actor
    gpus_per_actor: float
    batch_size: int
    wait_for_actors_s: float = 0.0  # > 0: the pool's first actors may wait this long for nodes to join
    threads_per_actor: int = 1  # torch intra-op threads of each actor


def plan_actors(config: AnnotateConfig, nodes: list[dict]) -> ActorPlan:
    """Defaults for the model stage from the cluster's nodes (``ray.nodes()``), checked so the
    job cannot stall waiting for resources that do not exist - unless ``--wait-for-gpus`` says
    the autoscaler will add them, in which case the wait is bounded instead."""
    alive = [node["Resources"] for node in nodes if node.get("Alive", True)]
    total_gpus = sum(r.get("GPU", 0) for r in alive)
    node_cpus = max((r.get("CPU", 0) for r in alive), default=0)
    total_cpus = sum(r.get("CPU", 0) for r in alive)
    waiting = config.wait_for_gpus > 0
    default_gpus = 1.0 if total_gpus > 0 or waiting else 0.0
    gpus = config.gpus_per_actor if config.gpus_per_actor is not None else default_gpus
    gpus_up = gpus <= max((r.get("GPU", 0) for r in alive), default=0)
    if gpus < 0 or (gpus > 0 and not gpus_up and not waiting):
        raise ActorPlanError(
            f"--gpus-per-actor {gpus:g}: no node of this cluster has that many GPUs ({total_gpus:g} in all); "
            "if the autoscaler adds GPU nodes on demand, pass --wait-for-gpus SECONDS"
        )
    if config.cpus_per_actor is not None:
        cpus, threads = config.cpus_per_actor, max(1, math.floor(config.cpus_per_actor))
    elif gpus > 0:
        cpus, threads = 1.0, 1
    else:  # one logical CPU left for the decode and write tasks; their work is light next to the model's
        cpus, threads = max(1.0, node_cpus - 1), max(1, math.floor(node_cpus))
    if config.actors is None:
        count = max(1, int(total_gpus // gpus)) if gpus > 0 else 1
        min_actors = max_actors = count
    else:
        min_actors, max_actors = parse_actors(config.actors)
    if gpus == 0 or gpus_up:  # nodes yet to join bring their own CPUs: nothing to check them against
        if cpus <= 0 or cpus > node_cpus:
            raise ActorPlanError(
                f"--cpus-per-actor {cpus:g}: must be > 0 and fit on one node (largest has {node_cpus:g} CPUs)"
            )
        if min_actors * cpus >= total_cpus:
            raise ActorPlanError(
                f"{min_actors} actor(s) x {cpus:g} CPUs leave none of the cluster's {total_cpus:g} CPUs for reading "
                "and decoding images: lower --actors or --cpus-per-actor"
            )
    elif cpus <= 0:
        raise ActorPlanError(f"--cpus-per-actor {cpus:g}: must be > 0")
    batch_size = (
        config.batch_size if config.batch_size is not None else (GPU_BATCH_SIZE if gpus > 0 else CPU_BATCH_SIZE)
    )
    wait = config.wait_for_gpus if gpus > 0 else 0.0
    return ActorPlan(min_actors, max_actors, cpus, gpus, batch_size, threads_per_actor=threads, wait_for_actors_s=wait)


def parse_actors(text: str) -> tuple[int, int]:
    """``N`` -> (N, N); ``MIN,MAX`` -> (MIN, MAX)."""
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or parts[0] < 1 or parts[1] < parts[0]:
        raise ActorPlanError(f"--actors {text!r}: expected N or MIN,MAX with 1 <= MIN <= MAX")
    return parts[0], parts[1]
