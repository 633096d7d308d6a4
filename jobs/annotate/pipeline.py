"""The annotate job's Ray Data pipeline: object storage -> decode tasks -> model actors -> Parquet.

The stream, with memory flat whatever the archive's size or OUTPUT's history (no take_all, no
materialize, no set of done URIs):

1. take OUTPUT's lease and bring its done index in line with its files (:mod:`jobs.annotate.output`);
2. list INPUT in parallel parts, each merged against the done index (:mod:`jobs.annotate.listing`);
   a manifest is first grouped into key ranges, de-duplicated and merged range by range;
3. read, decode (EXIF, RGB) and resize images in parallel CPU tasks (:mod:`jobs.annotate.decoding`);
4. detect in an actor pool that loads the weights once per actor (:mod:`jobs.annotate.detector`),
   laid out on the cluster by :mod:`jobs.annotate.actor_plan`;
5. write Parquet files as blocks arrive; then index this run's files, write ``_SUCCESS.json``
   (``--render`` then draws a few of them: :mod:`jobs.annotate.render`).

Every stage's retries are bounded. A decode task whose worker dies is retried; the retry decodes
each object in a child process, so an object that crashes the decoder becomes an error row
(:mod:`jobs.annotate.decoder_process`). An actor that dies (OOM, preempted node) is restarted by
Ray and its in-flight batches are retried.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

from coco import DETECTIONS_SCHEMA
from detr.checkpoint import check_weights
from detr.image_decoding import ImageDecodeError
from jobs.annotate import ray_start
from jobs.annotate.actor_plan import ActorPlan, plan_actors
from jobs.annotate.decoding import decode_block, enter_idle_class
from jobs.annotate.detector import Detector, DetectorConfig
from jobs.annotate.done_index import Segment
from jobs.annotate.listing import (
    check_input,
    list_folder_task,
    manifest_boundaries,
    part_row,
    plan_listing,
    read_manifest_task,
    remaining_in_range_task,
)
from jobs.annotate.output import OutputFolder, RunFilenames, Summary
from jobs.annotate.render import render_detections
from jobs.annotate.settings import AnnotateConfig, AnnotateError
from jobs.annotate.startup_clock import FirstBatchClock
from jobs.cli import JobFailedError
from storage import ReadPolicy, arrow_filesystem, redact

if TYPE_CHECKING:  # Ray is imported when the job runs, so --help and argument errors stay instant
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
# Ray Data retries tasks and actor calls forever by default. A task is retried when its worker
# dies; a decode task's first retry isolates the decoder, the others cover lost nodes.
TASK_RETRIES = 3
# A batch whose actor died is tried again on a restarted actor; a batch that kills every actor it
# reaches must end the job, not restart actors forever. Actors themselves may restart any number
# of times (a long run on preemptible nodes loses many), each restart charged to the batches lost.
ACTOR_TASK_RETRIES = 3


# Listing streams running at once, each in a worker of its own (~10^4 keys/s each on S3): each
# holds a page and one index part per segment.
LISTING_CONCURRENCY = 8


class BadImageError(JobFailedError):
    """``--fail-on-error`` stopped the job at an image that could not be annotated."""


def main(config: AnnotateConfig, *, started: float | None = None) -> Summary:
    """Run the job; returns what it did.

    Args:
        started: when the job was launched (``time.time()``), what the start-up figure counts
            from; default: now.

    Raises:
        UserError subclasses (and the model's and storage's errors) for unusable arguments,
        input or weights; :class:`BadImageError` when ``--fail-on-error`` stops it.
    """
    import ray

    job_started = time.time() if started is None else started
    check_input(config.input)
    # Check the weights here first: a missing file, failed download or wrong checkpoint is one
    # clear error now instead of dying actors later, and it fills this node's download cache.
    # Names and shapes only: the model itself is built once, in each actor.
    _, model_name = check_weights(config.weights)
    output = OutputFolder(config.output)
    output.prepare()
    run_id = time.strftime("%Y%m%dT%H%M%S") + uuid.uuid4().hex[:6]
    with output.lease(run_id):
        segments = output.done_segments()
        output.clear_marker()
        ray_start.connect()
        plan = plan_actors(config, ray.nodes())
        detector = DetectorConfig(
            weights=config.weights,
            threshold=config.threshold,
            precision=config.precision,
            use_gpu=plan.gpus_per_actor > 0,
            cpu_threads=plan.threads_per_actor,
        )
        clock = FirstBatchClock(run_id)
        annotated = build_dataset(config, plan, detector, output, segments, clock)
        filesystem, path = arrow_filesystem(config.output)
        started = time.perf_counter()
        write = functools.partial(_write, annotated, config, plan, path, filesystem, run_id)
        if plan.gpus_per_actor == 0:
            _run_below_the_model(write)
        else:
            write()
        skipped = sum(s.rows for s in segments)
        summary = output.summarize(run_id, skipped=skipped, seconds=time.perf_counter() - started)
        first_batch = clock.read()
        if first_batch is not None:
            summary = dataclasses.replace(summary, startup_seconds=first_batch - job_started)
        output.index_run(run_id, segments)
        output.write_marker(summary, model_name, arguments(config))
    if config.render_count:
        render_detections(output.fs, list(output.files(run_id)), config.render_count, config.render_dir)
    return summary


def arguments(config: AnnotateConfig) -> dict:
    """The run's settings as written into ``_SUCCESS.json``: URIs without secrets."""
    values = dataclasses.asdict(config)
    for name in ("input", "output", "weights", "render_dir"):
        if values[name] is not None:
            values[name] = redact(values[name])
    return values


def _run_below_the_model(work: Callable[[], None]) -> None:
    """``work()`` in a thread of Linux's idle scheduling class, with the executor thread Ray Data
    starts from it: on a CPU-only run the driver's scheduling loop (~4% of a core on 2 cores)
    would preempt a model thread, and the other one would wait for it; in that class it runs on
    the cores the model leaves idle. A thread of its own, because the caller's could not return
    to the normal class unprivileged. Elsewhere, ``work()`` here."""
    if not hasattr(os, "SCHED_IDLE"):
        work()
        return
    failure: list[BaseException] = []

    def run() -> None:
        enter_idle_class()
        try:
            work()
        except BaseException as error:  # noqa: BLE001 - raised again in the caller's thread
            failure.append(error)

    thread = threading.Thread(target=run, name="annotate-write", daemon=True)  # Ctrl-C need not wait for it
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def _write(annotated, config: AnnotateConfig, plan: ActorPlan, path: str, filesystem, run_id: str) -> None:
    import ray

    try:
        annotated.write_parquet(
            path,
            filesystem=filesystem,
            schema=DETECTIONS_SCHEMA,
            filename_provider=RunFilenames(run_id),
            min_rows_per_file=config.rows_per_file,
            # A retried write task rewrites its own file name. Writes are small (detections, no pixels):
            # holding a CPU would queue them behind decoding, results waiting unwritten until the end.
            ray_remote_args={"max_retries": TASK_RETRIES, "num_cpus": 0},
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


def build_dataset(
    config: AnnotateConfig,
    plan: ActorPlan,
    detector: DetectorConfig,
    output: OutputFolder,
    segments: list[Segment],
    clock: FirstBatchClock | None = None,
) -> ray.data.Dataset:
    """The lazy pipeline: listing parts -> not-yet-done URIs -> decode tasks -> detector actors.

    Args:
        clock: what the actors report their first batch to, or None.
    """
    import ray

    # Ray 2.60 takes retry bounds only as map_batches' **ray_remote_args, deprecated for 2.64
    # with no named replacement yet: the bounds matter more than the warning.
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
    block_rows = BATCHES_PER_BLOCK * plan.batch_size
    parts, _ = plan_listing(config.input, config.manifest_column)
    rows = [part_row(p) for p in parts]
    inputs = ray.data.from_items(rows, override_num_blocks=len(rows))
    context = inputs.context  # a copy owned by this job's datasets: the settings below stay here
    context.target_max_block_size = BLOCK_BYTES
    if plan.wait_for_actors_s > 0:  # start the pool first and give up after the wait, instead of hanging
        context.wait_for_min_actors_s = plan.wait_for_actors_s
    image_bytes = 3 * config.min_size * config.max_size  # the most a resized image can hold
    queue_bytes = QUEUED_BLOCKS_PER_ACTOR * plan.max_actors * block_rows * image_bytes
    context.execution_options.resource_limits = context.execution_options.resource_limits.copy(
        object_store_memory=max(MIN_OBJECT_STORE_BYTES, queue_bytes)
    )
    # An absolute URI: a relative local OUTPUT would resolve against each worker's own directory.
    index = {"output": output.fs.unstrip_protocol(output.root), "segments": segments}
    listing = {
        "batch_size": 1,
        "batch_format": "pyarrow",
        # Listing waits on the network: holding a CPU could starve the decode tasks on small machines.
        "num_cpus": 0,
        "compute": ray.data.TaskPoolStrategy(size=min(LISTING_CONCURRENCY, len(rows))),
        "max_retries": TASK_RETRIES,
    }
    if parts[0].kind == "folder":
        images = inputs.map_batches(list_folder_task, fn_kwargs={**index, "extensions": config.extensions}, **listing)
    else:
        boundaries = manifest_boundaries(parts, len(parts))
        entries = inputs.map_batches(read_manifest_task, fn_kwargs={"boundaries": boundaries}, **listing)
        images = entries.groupby("range", num_partitions=len(boundaries) + 1).map_groups(
            remaining_in_range_task, batch_format="pyarrow", fn_kwargs=index, num_cpus=0.25, max_retries=TASK_RETRIES
        )
    if config.limit is not None:
        images = images.limit(config.limit)
    prepared = images.repartition(target_num_rows_per_block=block_rows).map_batches(
        decode_block,
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=1,
        memory=DECODE_MEMORY,
        max_retries=TASK_RETRIES,
        fn_kwargs={
            "min_size": config.min_size,
            "max_size": config.max_size,
            "fail_on_error": config.fail_on_error,
            "reduced_jpeg": not config.full_jpeg_decode,
            "read_policy": ReadPolicy(max_bytes=config.max_object_bytes),
        },
    )
    return prepared.map_batches(
        Detector,
        fn_constructor_args=(detector, clock),
        batch_size=plan.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.max_actors),
        num_cpus=plan.cpus_per_actor,
        num_gpus=plan.gpus_per_actor,
        # Decoding already bounds what reaches an actor (max-size^2 pixels, bombs rejected).
        max_restarts=-1,
        max_task_retries=ACTOR_TASK_RETRIES,
    )


def _bad_image_reason(error: BaseException) -> str | None:
    """The "<uri>: <reason>" of an ImageDecodeError raised in a decode task. Ray Data re-raises
    it as a RayTaskError(UserCodeException) that keeps only the remote traceback's text."""
    if isinstance(error, ImageDecodeError):
        return str(error)
    match = re.search(rf"{ImageDecodeError.__name__}: (.+)", str(error))
    return match.group(1).strip() if match else None
