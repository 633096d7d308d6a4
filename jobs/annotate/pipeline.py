"""The annotate job's Ray Data pipeline: object storage -> decode tasks -> model actors -> Parquet.

The stream, with memory flat whatever the archive's size (no take_all, no materialize):

1. list INPUT lazily in one task (:mod:`jobs.annotate.listing`), minus what OUTPUT holds
   (:mod:`jobs.annotate.output`);
2. read, decode (EXIF, RGB) and resize images in parallel CPU tasks (:mod:`jobs.annotate.decoding`);
3. detect in an actor pool that loads the weights once per actor (:mod:`jobs.annotate.detector`),
   laid out on the cluster by :mod:`jobs.annotate.actor_plan`;
4. write Parquet files as blocks arrive (``--render`` then draws a few of them:
   :mod:`jobs.annotate.render`).

An actor that dies (OOM, preempted node) is restarted by Ray and its in-flight batches are retried.
"""

from __future__ import annotations

import dataclasses
import re
import time
import uuid
from typing import TYPE_CHECKING

import detr
from coco import DETECTIONS_SCHEMA
from detr.image_decoding import ImageDecodeError
from jobs.annotate.actor_plan import ActorPlan, plan_actors
from jobs.annotate.decoding import prepare_images
from jobs.annotate.detector import Detector, DetectorConfig
from jobs.annotate.listing import check_input, list_image_uris
from jobs.annotate.output import RunFilenames, Summary, completed_uris, run_files, summarize
from jobs.annotate.render import render_detections
from jobs.annotate.settings import AnnotateConfig, AnnotateError
from jobs.cli import JobFailedError
from storage import arrow_filesystem

if TYPE_CHECKING:  # Ray is imported when the job runs, so --help and argument errors stay instant
    import pyarrow as pa
    import ray

# Model batches per decode task: enough that task overhead is noise, few enough that a few
# hundred images still spread over every CPU.
BATCHES_PER_BLOCK = 4
# Decoded blocks queued per actor: keeps every actor fed without letting a long run hold more
# object-store memory than a short one; the floor is room for the other stages' small blocks.
QUEUED_BLOCKS_PER_ACTOR = 4
MIN_OBJECT_STORE_BYTES = 64 * 1024**2
# Ray Data's output block size (default 128 MiB): at 1 MiB the listing hands over ~10^4 URIs at a time.
BLOCK_BYTES = 1024**2
# Per decode task: the worker (~0.45 GB) and one image at the decompression-bomb limit. Distinct
# resources also keep Ray from fusing decoding into the actor pool, behind inference.
DECODE_MEMORY = 1024**3


class BadImageError(JobFailedError):
    """``--fail-on-error`` stopped the job at an image that could not be annotated."""


def main(config: AnnotateConfig) -> Summary:
    """Run the job; returns what it did.

    Raises:
        UserError subclasses (and the model's and storage's errors) for unusable arguments,
        input or weights; :class:`BadImageError` when ``--fail-on-error`` stops it.
    """
    import ray

    job_started = time.time()
    check_input(config.input)
    # Check the weights here first: a missing file, failed download or wrong checkpoint is one
    # clear error now instead of dying actors later, and it fills this node's download cache.
    # Names and shapes only: the model itself is built once, in each actor.
    detr.check_weights(config.weights)
    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS (ray job submit) or a fresh local cluster
    plan = plan_actors(config, ray.nodes())
    detector = DetectorConfig(
        weights=config.weights,
        threshold=config.threshold,
        precision=config.precision,
        use_gpu=plan.gpus_per_actor > 0,
        cpu_threads=plan.threads_per_actor,
    )
    clock = _first_batch_clock()
    done = completed_uris(config.output)
    run_id = time.strftime("%Y%m%dT%H%M%S") + uuid.uuid4().hex[:6]
    annotated = build_dataset(config, plan, detector, ray.put(done) if done is not None else None, clock)
    filesystem, path = arrow_filesystem(config.output)
    started = time.perf_counter()
    try:
        annotated.write_parquet(
            path,
            filesystem=filesystem,
            schema=DETECTIONS_SCHEMA,
            filename_provider=RunFilenames(run_id),
            min_rows_per_file=config.rows_per_file,
        )
    except ray.exceptions.GetTimeoutError:
        raise AnnotateError(
            f"no model actor started within --wait-for-gpus {config.wait_for_gpus:g} s: no node with "
            f"{plan.gpus_per_actor:g} GPU(s) joined (check the cluster's GPU node type and its limits) or loading "
            "the weights took longer; nothing was written"
        ) from None
    except Exception as error:  # noqa: BLE001 - find our own error inside Ray's wrappers
        bad_image = _bad_image_reason(error)
        if bad_image is None:
            raise
        raise BadImageError(f"{bad_image} (--fail-on-error)") from None
    summary = summarize(
        config.output, run_id, skipped=len(done) if done is not None else 0, seconds=time.perf_counter() - started
    )
    first_batch = ray.get(clock.earliest.remote())
    if first_batch is not None:
        summary = dataclasses.replace(summary, startup_seconds=first_batch - job_started)
    if config.render_count:
        render_detections(*run_files(config.output, run_id), config.render_count, config.render_dir)
    return summary


def _list_minus_done(batch: pa.Table, *, done_ref: ray.ObjectRef | None, **listing) -> pa.Table:
    """The listing task: fetches the completed URIs from the object store once, then lists."""
    import ray

    done = frozenset(ray.get(done_ref).to_pylist()) if done_ref is not None else frozenset()
    yield from list_image_uris(batch, done=done, **listing)


def _first_batch_clock() -> ray.actor.ActorHandle:
    """A tiny actor keeping the earliest time (``time.time()``) at which a model actor finished a
    batch: each actor calls ``note`` once (:class:`Detector`'s ``on_first_batch``)."""
    import ray

    # Defined in here, not at module level, so that Ray ships the class by value and the clock's
    # worker imports neither this package nor torch.
    @ray.remote(num_cpus=0)
    class FirstBatchClock:
        def __init__(self) -> None:
            self.first: float | None = None

        def note(self, wall_time: float) -> None:
            self.first = wall_time if self.first is None else min(self.first, wall_time)

        def earliest(self) -> float | None:
            return self.first

    return FirstBatchClock.remote()


def build_dataset(
    config: AnnotateConfig,
    plan: ActorPlan,
    detector: DetectorConfig,
    done: ray.ObjectRef | None,
    clock: ray.actor.ActorHandle | None = None,
) -> ray.data.Dataset:
    """The lazy pipeline: listing -> blocks of URIs -> decode tasks -> detector actors.

    Args:
        done: object-store reference to the URIs already in OUTPUT, or None.
        clock: a :func:`_first_batch_clock` the actors report their first batch to, or None.
    """
    import ray

    block_rows = BATCHES_PER_BLOCK * plan.batch_size
    inputs = ray.data.from_items([{"input": config.input}])
    context = inputs.context  # a copy owned by this job's datasets: the settings below stay here
    context.target_max_block_size = BLOCK_BYTES
    if plan.wait_for_actors_s > 0:  # start the pool first and give up after the wait, instead of hanging
        context.wait_for_min_actors_s = plan.wait_for_actors_s
    image_bytes = 3 * config.min_size * config.max_size  # the most a resized image can hold
    queue_bytes = QUEUED_BLOCKS_PER_ACTOR * plan.max_actors * block_rows * image_bytes
    context.execution_options.resource_limits = context.execution_options.resource_limits.copy(
        object_store_memory=max(MIN_OBJECT_STORE_BYTES, queue_bytes)
    )
    images = inputs.map_batches(
        _list_minus_done,
        batch_size=None,
        batch_format="pyarrow",
        fn_kwargs={"extensions": config.extensions, "manifest_column": config.manifest_column, "done_ref": done},
        # Listing waits on the network, and this one task lives until the listing ends:
        # holding a CPU could starve the decode tasks on small machines.
        num_cpus=0,
    )
    if config.limit is not None:
        images = images.limit(config.limit)
    prepared = images.repartition(target_num_rows_per_block=block_rows).map_batches(
        prepare_images,
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=1,
        memory=DECODE_MEMORY,
        fn_kwargs={
            "min_size": config.min_size,
            "max_size": config.max_size,
            "fail_on_error": config.fail_on_error,
            "reduced_jpeg": not config.full_jpeg_decode,
        },
    )
    return prepared.map_batches(
        Detector,
        fn_constructor_args=(detector, clock.note.remote if clock is not None else None),
        batch_size=plan.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.max_actors),
        num_cpus=plan.cpus_per_actor,
        num_gpus=plan.gpus_per_actor,
        # Ray Data's actor-pool default restarts a dead actor and retries its batches; decoding
        # already bounds what reaches an actor (max-size^2 pixels, bombs rejected).
    )


def _bad_image_reason(error: BaseException) -> str | None:
    """The "<uri>: <reason>" of an ImageDecodeError raised in a decode task. Ray Data re-raises
    it as a RayTaskError(UserCodeException) that keeps only the remote traceback's text."""
    if isinstance(error, ImageDecodeError):
        return str(error)
    match = re.search(rf"{ImageDecodeError.__name__}: (.+)", str(error))
    return match.group(1).strip() if match else None
