"""The annotate job's Ray Data pipeline: object storage -> decode tasks -> model actors -> Parquet.

The stream, with memory flat whatever the archive's size (no take_all, no materialize):

1. list INPUT lazily in one task (:mod:`jobs.annotate.listing`), minus what OUTPUT holds
   (:mod:`jobs.annotate.output`);
2. read, decode (EXIF, RGB) and resize images in parallel CPU tasks (:mod:`jobs.annotate.decoding`);
3. detect in an actor pool that loads the weights once per actor (:mod:`jobs.annotate.detector`),
   laid out on the cluster by :mod:`jobs.annotate.actor_plan`;
4. write Parquet files as blocks arrive (``--render`` then draws a few of them:
   :mod:`jobs.annotate.render`).

Every stage's retries are bounded. A decode task whose worker dies is retried; the retry decodes
each object in a child process, so an object that crashes the decoder becomes an error row
(:mod:`jobs.annotate.decoder_process`). An actor that dies (OOM, preempted node) is restarted by
Ray and its in-flight batches are retried.
"""

from __future__ import annotations

import math
import re
import time
import uuid
import warnings
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
from storage import ReadPolicy, arrow_filesystem

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
# Ray Data retries tasks and actor calls forever by default. A task is retried when its worker
# dies; a decode task's first retry isolates the decoder, the others cover lost nodes.
TASK_RETRIES = 3
# A batch whose actor died is tried again on a restarted actor; a batch that kills every actor it
# reaches must end the job, not restart actors forever. Actors themselves may restart any number
# of times (a long run on preemptible nodes loses many), each restart charged to the batches lost.
ACTOR_TASK_RETRIES = 3


class BadImageError(JobFailedError):
    """``--fail-on-error`` stopped the job at an image that could not be annotated."""


def main(config: AnnotateConfig) -> Summary:
    """Run the job; returns what it did.

    Raises:
        UserError subclasses (and the model's and storage's errors) for unusable arguments,
        input or weights; :class:`BadImageError` when ``--fail-on-error`` stops it.
    """
    import ray

    check_input(config.input)
    # Load the weights here first: a missing file, failed download or wrong checkpoint is one
    # clear error now instead of dying actors later, and it fills this node's download cache.
    detr.from_pretrained(config.weights)
    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS (ray job submit) or a fresh local cluster
    plan = plan_actors(config, ray.nodes())
    detector = DetectorConfig(
        weights=config.weights,
        threshold=config.threshold,
        precision=config.precision,
        use_gpu=plan.gpus_per_actor > 0,
        cpu_threads=max(1, math.floor(plan.cpus_per_actor)),
    )
    done = completed_uris(config.output)
    run_id = time.strftime("%Y%m%dT%H%M%S") + uuid.uuid4().hex[:6]
    annotated = build_dataset(config, plan, detector, ray.put(done) if done is not None else None)
    filesystem, path = arrow_filesystem(config.output)
    started = time.perf_counter()
    try:
        annotated.write_parquet(
            path,
            filesystem=filesystem,
            schema=DETECTIONS_SCHEMA,
            filename_provider=RunFilenames(run_id),
            min_rows_per_file=config.rows_per_file,
            ray_remote_args={"max_retries": TASK_RETRIES},  # a retried write task rewrites its own file name
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
    if config.render_count:
        render_detections(*run_files(config.output, run_id), config.render_count, config.render_dir)
    return summary


def _list_minus_done(batch: pa.Table, *, done_ref: ray.ObjectRef | None, **listing) -> pa.Table:
    """The listing task: fetches the completed URIs from the object store once, then lists."""
    import ray

    done = frozenset(ray.get(done_ref).to_pylist()) if done_ref is not None else frozenset()
    yield from list_image_uris(batch, done=done, **listing)


def build_dataset(
    config: AnnotateConfig, plan: ActorPlan, detector: DetectorConfig, done: ray.ObjectRef | None
) -> ray.data.Dataset:
    """The lazy pipeline: listing -> blocks of URIs -> decode tasks -> detector actors.

    Args:
        done: object-store reference to the URIs already in OUTPUT, or None.
    """
    import ray

    # Ray 2.60 takes retry bounds only as map_batches' **ray_remote_args, deprecated for 2.64
    # with no named replacement yet: the bounds matter more than the warning.
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
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
        max_retries=TASK_RETRIES,
    )
    if config.limit is not None:
        images = images.limit(config.limit)
    prepared = images.repartition(target_num_rows_per_block=block_rows).map_batches(
        _prepare_block,
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
        fn_constructor_args=(detector,),
        batch_size=plan.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.max_actors),
        num_cpus=plan.cpus_per_actor,
        num_gpus=plan.gpus_per_actor,
        # Decoding already bounds what reaches an actor (max-size^2 pixels, bombs rejected).
        max_restarts=-1,
        max_task_retries=ACTOR_TASK_RETRIES,
    )


def _prepare_block(batch: pa.Table, **settings) -> pa.Table:
    """The decode task: :func:`prepare_images`, with the decoder isolated when Ray retries the
    task (its worker died, maybe of a decoder crash on one of these objects)."""
    return prepare_images(batch, isolate_decoder=_task_attempt() > 0, **settings)


def _task_attempt() -> int:
    """0 for a task's first run, 1 for its first retry, ... (1 where Ray no longer says: isolating
    every block is slower but safe)."""
    import ray

    try:
        return ray._private.worker.global_worker.core_worker.get_current_task_attempt_number()
    except AttributeError:
        return 1


def _bad_image_reason(error: BaseException) -> str | None:
    """The "<uri>: <reason>" of an ImageDecodeError raised in a decode task. Ray Data re-raises
    it as a RayTaskError(UserCodeException) that keeps only the remote traceback's text."""
    if isinstance(error, ImageDecodeError):
        return str(error)
    match = re.search(rf"{ImageDecodeError.__name__}: (.+)", str(error))
    return match.group(1).strip() if match else None
