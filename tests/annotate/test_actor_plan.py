"""jobs/annotate/actor_plan.py: where the model actors go, worked out from the cluster's nodes."""

from __future__ import annotations

import pytest

from jobs.annotate import parse_config
from jobs.annotate.actor_plan import ActorPlanError, parse_actors, plan_actors


def _nodes(*resources: dict) -> list[dict]:
    return [{"Alive": True, "Resources": r} for r in resources]


def test_actor_plan_defaults_fit_the_cluster():
    defaults = parse_config([])
    cpu = plan_actors(defaults, _nodes({"CPU": 2.0}))
    assert (cpu.min_actors, cpu.max_actors, cpu.cpus_per_actor, cpu.gpus_per_actor) == (1, 1, 1.0, 0.0)
    assert cpu.threads_per_actor == 2, "torch runs on every core; one CPU is only reserved for decode tasks"
    gpu = plan_actors(defaults, _nodes({"CPU": 16.0, "GPU": 4.0}, {"CPU": 16.0, "GPU": 4.0}))
    assert (gpu.min_actors, gpu.max_actors, gpu.cpus_per_actor, gpu.gpus_per_actor) == (8, 8, 1.0, 1.0)
    assert gpu.batch_size == 16 and gpu.threads_per_actor == 1
    scaled = plan_actors(parse_config(["--actors", "2,6", "--gpus-per-actor", "0.5"]), _nodes({"CPU": 8.0, "GPU": 1.0}))
    assert (scaled.min_actors, scaled.max_actors, scaled.gpus_per_actor) == (2, 6, 0.5)
    assert parse_actors("3") == (3, 3)
    with pytest.raises(ActorPlanError, match="--actors '4,2': expected N or MIN,MAX"):
        parse_actors("4,2")
    with pytest.raises(ActorPlanError, match="leave none of the cluster's 2 CPUs"):
        plan_actors(parse_config(["--actors", "2", "--cpus-per-actor", "1"]), _nodes({"CPU": 2.0}))
    with pytest.raises(ActorPlanError, match="--gpus-per-actor 1: no node"):
        plan_actors(parse_config(["--gpus-per-actor", "1"]), _nodes({"CPU": 2.0}))
    assert plan_actors(defaults, _nodes({"CPU": 2.0})).wait_for_actors_s == 0


def test_gpu_actors_may_wait_for_an_autoscaler_to_add_gpu_nodes():
    # A KubeRay cluster whose GPU group starts at zero replicas: only the head (no CPUs for tasks) is up.
    head_only = _nodes({"CPU": 0.0})
    plan = plan_actors(parse_config(["--wait-for-gpus", "900", "--actors", "1,4"]), head_only)
    assert (plan.gpus_per_actor, plan.cpus_per_actor, plan.min_actors, plan.max_actors) == (1.0, 1.0, 1, 4)
    assert plan.wait_for_actors_s == 900 and plan.batch_size == 16
    with pytest.raises(ActorPlanError, match="pass --wait-for-gpus SECONDS"):
        plan_actors(parse_config(["--gpus-per-actor", "1"]), head_only)
    # Asked for CPU inference, nothing waits.
    cpu = plan_actors(parse_config(["--wait-for-gpus", "900", "--gpus-per-actor", "0"]), _nodes({"CPU": 4.0}))
    assert cpu.wait_for_actors_s == 0 and cpu.gpus_per_actor == 0


def test_cpu_actor_reserves_all_cpus_but_one_and_runs_on_all_cores():
    defaults = parse_config([])
    big = plan_actors(defaults, _nodes({"CPU": 4.0}, {"CPU": 32.0, "memory": 1e11}))
    assert (big.cpus_per_actor, big.threads_per_actor, big.batch_size) == (31.0, 32, 4)
    # Flags are honoured as given: threads follow an explicit --cpus-per-actor.
    asked = plan_actors(parse_config(["--cpus-per-actor", "2.5", "--actors", "2"]), _nodes({"CPU": 8.0}))
    assert (asked.cpus_per_actor, asked.threads_per_actor, asked.min_actors) == (2.5, 2, 2)
    fraction = plan_actors(parse_config(["--cpus-per-actor", "0.5"]), _nodes({"CPU": 2.0}))
    assert (fraction.cpus_per_actor, fraction.threads_per_actor) == (0.5, 1)
    gpu_cpus = plan_actors(parse_config(["--cpus-per-actor", "4"]), _nodes({"CPU": 8.0, "GPU": 1.0}))
    assert (gpu_cpus.cpus_per_actor, gpu_cpus.threads_per_actor, gpu_cpus.gpus_per_actor) == (4.0, 4, 1.0)
    with pytest.raises(ActorPlanError, match=r"--cpus-per-actor 9: must be > 0 and fit on one node \(largest has 8"):
        plan_actors(parse_config(["--cpus-per-actor", "9"]), _nodes({"CPU": 8.0}))
    with pytest.raises(ActorPlanError, match="leave none of the cluster's 1 CPUs"):
        plan_actors(defaults, _nodes({"CPU": 1.0}))
