"""Annotate an image archive with DETR: object storage -> Ray Data -> Parquet.

    python -m jobs.annotate INPUT OUTPUT [options]
    ray job submit -- python -m jobs.annotate s3://bucket/images s3://bucket/detections

The stream, with memory flat whatever the archive's size (no take_all, no materialize):

1. list INPUT lazily in one task (:mod:`jobs.image_source`), minus what OUTPUT holds;
2. read, decode (EXIF, RGB) and resize images in parallel CPU tasks (:mod:`jobs.image_decoding`);
3. detect in an actor pool that loads the weights once per actor (:mod:`jobs.detector`), laid out
   on the cluster by :mod:`jobs.actor_plan`;
4. write Parquet files as blocks arrive, in the schema documented in :mod:`jobs.detector`
   (``--render`` then draws a few of them: :mod:`jobs.render`).

Resume: every run writes files named ``annotations-<run id>-...parquet``; a re-run with the
same OUTPUT skips every URI already present in a complete file, so killing a job and
starting it again ends with every input exactly once. An actor that dies (OOM, preempted
node) is restarted by Ray and its in-flight batches are retried.
"""

from __future__ import annotations

import argparse
import math
import posixpath
import re
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.compute as pc
import pyarrow.parquet as pq

import detr
from jobs.actor_plan import CPU_BATCH_SIZE, GPU_BATCH_SIZE, ActorPlan, ActorPlanError, plan_actors
from jobs.detector import OUTPUT_SCHEMA, Detector, DetectorConfig, PRECISIONS
from jobs.image_decoding import ImageDecodeError, prepare_images
from jobs.image_source import (
    DEFAULT_EXTENSIONS, ImageSourceError, arrow_filesystem, check_input, completed_uris, filesystem_for,
    list_image_uris,
)
from jobs.render import render_detections

if TYPE_CHECKING:  # Ray is imported when the job runs, so --help and argument errors stay instant
    import ray

SAMPLE_IMAGES = Path(__file__).resolve().parent / "sample_images"
DEFAULT_OUTPUT = "./detr-ray-output"
# Model batches per block of URIs, the unit of work of a decode task: enough images
# (GPU default: 64, ~1 s of decoding) that task overhead is noise, few enough that decoding
# spreads over all CPUs even for a few hundred images.
BATCHES_PER_BLOCK = 4
# Decoded images wait for an actor in the object store. Unbounded, Ray Data lets them pile
# up to its default budget (a share of 30% of RAM) wherever decoding outruns inference, so
# a long run would hold more memory than a short one. This many blocks per actor keep every
# actor fed; the floor leaves room for the small blocks of the other stages.
QUEUED_BLOCKS_PER_ACTOR = 4
MIN_OBJECT_STORE_BYTES = 64 * 1024**2
# Ray Data buffers a task's output until a block reaches this size (default 128 MiB). At
# 128 MiB the listing task would hand over nothing until ~2 M URIs were listed; at 1 MiB it
# hands over ~10^4 URIs at a time (about a second of S3 listing), and a resized image
# (up to ~5 MB) travels in a block of its own.
BLOCK_BYTES = 1024**2
# Memory reserved per decode task: the worker process itself (Python, torch, PIL: ~0.45 GB
# resident), one image at the decompression-bomb limit, which decodes to
# 3 x 89.5 M = 268 MB, plus its resized copy and the batch's encoded bytes. Declaring it
# also keeps Ray from fusing the decode stage into the actor pool (ops with different
# remote args are not fused), which would serialize decoding behind inference.
DECODE_MEMORY = 1024**3


class AnnotateError(ValueError):
    """Unusable arguments or cluster: one line for the user."""


class BadImageError(RuntimeError):
    """``--fail-on-error`` stopped the job at an image that could not be annotated."""


@dataclass(frozen=True)
class Summary:
    output: str
    run_id: str
    images: int  # rows written by this run
    errors: int
    detections: int
    skipped: int  # URIs already in OUTPUT before this run
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"annotate: {self.images} images ({self.images - self.errors} ok, {self.errors} errors), "
            f"{self.detections} detections, {self.images_per_second:.2f} img/s over {self.seconds:.1f} s; "
            f"{self.skipped} already in {self.output} were skipped"
        )


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each option's default, except where it is None: those help texts explain the
    default the job works out from the cluster, and "(default: None)" would contradict them."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The job's command line (also read by the cluster manifests' tests)."""
    parser = argparse.ArgumentParser(
        prog="python -m jobs.annotate",
        description="Detect objects in every image under INPUT with DETR on a Ray cluster and write Parquet to OUTPUT.",
        epilog=(
            "Object storage: s3:// (and S3-compatible stores through AWS_ENDPOINT_URL), gs://, any fsspec URI; "
            "credentials come from the usual environment/config chain, never from arguments. "
            "Re-running with the same OUTPUT resumes: images already written are skipped. "
            "Exit codes: 0 done, 1 --fail-on-error stopped at a bad image, 2 unusable arguments, input or weights. "
            "COCO results JSON from OUTPUT: python -m jobs.coco_export OUTPUT ANNOTATIONS.json RESULTS.json."
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("input", nargs="?", default=str(SAMPLE_IMAGES),
                        help="folder or prefix URI read recursively (local path, file://, s3://, gs://), or a manifest "
                             "of URIs: a .txt file (one per line) or a .parquet file (see --manifest-column); "
                             "default: the bundled sample images")
    parser.add_argument("output", nargs="?", default=DEFAULT_OUTPUT, help="folder URI for the Parquet files")
    parser.add_argument("--weights", default="detr-r50",
                        help="detr-r50, detr-r50-dc5, detr-r101, detr-r101-dc5 (downloaded once), "
                             "hf://facebook/detr-resnet-50, "
                             "or a checkpoint path/URI (on multi-node clusters, a URI every node can read)")
    parser.add_argument("--threshold", type=float, default=0.7,
                        help="keep detections with a class probability above this")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"images per model call (default: {GPU_BATCH_SIZE} on GPU, {CPU_BATCH_SIZE} on CPU); "
                             "split further by aspect ratio")
    parser.add_argument("--actors", default=None,
                        help="model actors: N for a fixed pool or MIN,MAX to autoscale "
                             "(default: one per GPU on a GPU cluster, else 1)")
    parser.add_argument("--gpus-per-actor", type=float, default=None,
                        help="GPUs per model actor, fractions allowed "
                             "(default: 1 when the cluster has GPUs or --wait-for-gpus is given, else 0: CPU inference)")
    parser.add_argument("--wait-for-gpus", type=float, default=0.0, metavar="SECONDS",
                        help="for clusters whose GPU workers start on demand (KubeRay minReplicas 0, autoscaling "
                             "node types): accept GPU actors although no GPU node is up yet, and fail if the "
                             "first actors have not started (node added, weights loaded) within SECONDS; "
                             "0 = GPUs must be up when the job starts")
    parser.add_argument("--cpus-per-actor", type=float, default=None,
                        help="CPUs reserved per model actor; torch uses that many threads (default: 1 with GPUs; "
                             "on CPU, all CPUs of the largest node but one, which is left to reading and decoding)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="inference precision: auto = fp32 on CPU, bf16 on GPU (fp16 where bf16 is unsupported)")
    parser.add_argument("--min-size", type=int, default=800, help="resize so the shorter side is this ...")
    parser.add_argument("--max-size", type=int, default=1333, help="... unless the longer side would exceed this")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="annotate at most N images not yet in OUTPUT")
    parser.add_argument("--extensions", default=",".join(DEFAULT_EXTENSIONS),
                        help="comma-separated file extensions to list under a folder/prefix (case-insensitive)")
    parser.add_argument("--manifest-column", default="uri", help="the URI column of a .parquet manifest")
    parser.add_argument("--rows-per-file", type=int, default=1000,
                        help="rows per Parquet file (a killed job redoes at most this many images per writer)")
    parser.add_argument("--render", nargs=2, default=None, metavar=("N", "DIR"),
                        help="also draw boxes, labels and scores on the first N annotated images "
                             "as PNGs under DIR (a URI)")
    parser.add_argument("--full-jpeg-decode", action="store_true",
                        help="decode every pixel of large JPEGs before resizing, as DetrImageProcessor does; by "
                             "default a JPEG at least twice the model's input size is decoded at 1/2-1/8 scale "
                             "(~6x faster for 12-megapixel photos, ~0.2/255 mean pixel difference)")
    parser.add_argument("--fail-on-error", action="store_true",
                        help="stop the job (exit 1) at the first image that cannot be read or decoded, "
                             "instead of writing an error row")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``sys.argv[1:]`` when ``argv`` is None)."""
    return build_parser().parse_args(argv)


def main(args: argparse.Namespace) -> Summary:
    """Run the job; returns what it did. Raises AnnotateError / ImageSourceError / detr errors
    for unusable arguments, BadImageError when ``--fail-on-error`` stops it."""
    import ray

    _check_args(args)
    check_input(args.input)
    # Load the weights here first: a missing file, failed download or wrong checkpoint is one
    # clear error now instead of dying actors later, and it fills this node's download cache.
    dilation = detr.from_pretrained(args.weights).config.dilation
    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS (ray job submit) or a fresh local cluster
    plan = plan_actors(args, ray.nodes())
    detector = DetectorConfig(
        weights=args.weights, threshold=args.threshold, precision=args.precision, use_gpu=plan.gpus_per_actor > 0,
        cpu_threads=max(1, math.floor(plan.cpus_per_actor)), dilation=dilation,
    )
    done = completed_uris(args.output)
    run_id = time.strftime("%Y%m%dT%H%M%S") + uuid.uuid4().hex[:6]
    annotated = build_dataset(args, plan, detector, ray.put(done) if done is not None else None)
    filesystem, path = arrow_filesystem(args.output)
    started = time.perf_counter()
    try:
        annotated.write_parquet(
            path, filesystem=filesystem, schema=OUTPUT_SCHEMA, filename_provider=RunFilenames(run_id),
            min_rows_per_file=args.rows_per_file,
        )
    except ray.exceptions.GetTimeoutError:
        raise AnnotateError(
            f"no model actor started within --wait-for-gpus {args.wait_for_gpus:g} s: no node with "
            f"{plan.gpus_per_actor:g} GPU(s) joined (check the cluster's GPU node type and its limits) or loading "
            "the weights took longer; nothing was written"
        ) from None
    except Exception as error:  # noqa: BLE001 - find our own error inside Ray's wrappers
        bad_image = _bad_image_reason(error)
        if bad_image is None:
            raise
        raise BadImageError(f"{bad_image} (--fail-on-error)") from None
    summary = summarize(args.output, run_id, skipped=len(done) if done is not None else 0,
                        seconds=time.perf_counter() - started)
    if args.render:
        render_detections(*_run_files(args.output, run_id), int(args.render[0]), args.render[1])
    return summary


def build_dataset(
    args: argparse.Namespace, plan: ActorPlan, detector: DetectorConfig, skip: ray.ObjectRef | None
) -> ray.data.Dataset:
    """The lazy pipeline: listing -> blocks of URIs -> decode tasks -> detector actors.

    Args:
        skip: object-store reference to the URIs already in OUTPUT, or None.
    """
    import ray

    block_rows = BATCHES_PER_BLOCK * plan.batch_size
    inputs = ray.data.from_items([{"input": args.input}])
    context = inputs.context  # a copy owned by this job's datasets: the settings below stay here
    context.target_max_block_size = BLOCK_BYTES
    if plan.wait_for_actors_s > 0:  # start the pool first and give up after the wait, instead of hanging
        context.wait_for_min_actors_s = plan.wait_for_actors_s
    image_bytes = 3 * args.min_size * args.max_size  # the most a resized image can hold
    queue_bytes = QUEUED_BLOCKS_PER_ACTOR * plan.max_actors * block_rows * image_bytes
    context.execution_options.resource_limits = context.execution_options.resource_limits.copy(
        object_store_memory=max(MIN_OBJECT_STORE_BYTES, queue_bytes)
    )
    images = inputs.map_batches(
        list_image_uris, batch_size=None, batch_format="pyarrow",
        fn_kwargs={"extensions": _extensions(args), "manifest_column": args.manifest_column, "skip": skip},
        # Listing waits on the network, and this one task lives until the listing ends:
        # holding a CPU could starve the decode tasks on small machines.
        num_cpus=0,
    )
    if args.limit is not None:
        images = images.limit(args.limit)
    prepared = images.repartition(target_num_rows_per_block=block_rows).map_batches(
        prepare_images, batch_size=None, batch_format="pyarrow", num_cpus=1, memory=DECODE_MEMORY,
        fn_kwargs={"min_size": args.min_size, "max_size": args.max_size, "fail_on_error": args.fail_on_error,
                   "reduced_jpeg": not args.full_jpeg_decode},
    )
    return prepared.map_batches(
        Detector, fn_constructor_args=(detector,), batch_size=plan.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.max_actors),
        num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor,
        # Fault tolerance is Ray Data's default for actor pools (max_restarts=-1,
        # max_task_retries=-1): a dead actor is restarted and its batches are retried. The
        # per-call override (extra ray_remote_args) is deprecated in Ray 2.60; unbounded
        # retries are safe here because decode already bounds what reaches an actor
        # (at most max-size^2 pixels per image, bombs rejected).
    )


def _check_args(args: argparse.Namespace) -> None:
    for name in ("batch_size", "limit", "rows_per_file"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise AnnotateError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not 0.0 <= args.threshold < 1.0:
        raise AnnotateError(f"--threshold must be in [0, 1), got {args.threshold}")
    if args.min_size < 1 or args.max_size < args.min_size:
        raise AnnotateError(f"need 1 <= --min-size <= --max-size, got {args.min_size} and {args.max_size}")
    if not _extensions(args):
        raise AnnotateError(f"--extensions {args.extensions!r}: no extension given")
    if args.wait_for_gpus < 0:
        raise AnnotateError(f"--wait-for-gpus must be >= 0 seconds, got {args.wait_for_gpus:g}")
    if args.render is not None and (not args.render[0].isdigit() or int(args.render[0]) < 1):
        raise AnnotateError(f"--render N DIR: N must be a positive integer, got {args.render[0]!r}")


def _extensions(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(e.strip().lower().lstrip(".") for e in args.extensions.split(",") if e.strip())


def _bad_image_reason(error: BaseException) -> str | None:
    """The "<uri>: <reason>" of an ImageDecodeError raised in a decode task. Ray Data re-raises
    it as a RayTaskError(UserCodeException) that keeps only the remote traceback's text."""
    if isinstance(error, ImageDecodeError):
        return str(error)
    match = re.search(rf"{ImageDecodeError.__name__}: (.+)", str(error))
    return match.group(1).strip() if match else None


class RunFilenames:
    """Ray ``FilenameProvider``: ``annotations-<run id>-<write uuid>_<task>.parquet``, so each
    run's files are new names and the run's own files can be found for its summary."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"annotations-{self.run_id}-{write_uuid}_{task_index:06}.parquet"


def _run_files(output: str, run_id: str) -> tuple[object, list[str]]:
    fs, root = filesystem_for(output)
    return fs, sorted(p for p in fs.find(root) if posixpath.basename(p).startswith(f"annotations-{run_id}-"))


def summarize(output: str, run_id: str, *, skipped: int, seconds: float) -> Summary:
    """Count this run's rows, errors and detections from its files, one file at a time."""
    fs, files = _run_files(output, run_id)
    images = errors = detections = 0
    for path in files:
        with fs.open(path, "rb") as stream:
            table = pq.read_table(stream, columns=["error", "detections"])
        images += table.num_rows
        errors += table.num_rows - table.column("error").null_count
        detections += int(pc.sum(pc.list_value_length(table.column("detections"))).as_py() or 0)
    return Summary(output, run_id, images, errors, detections, skipped, seconds)


def run_cli(argv: list[str] | None = None) -> int:
    """``python -m jobs.annotate``: one summary line on success, one error line otherwise."""
    try:
        summary = main(parse_args(argv))
    except BadImageError as error:
        print(f"annotate: error: {error}", file=sys.stderr)
        return 1
    except (AnnotateError, ActorPlanError, ImageSourceError, detr.WeightsUnavailableError,
            detr.CheckpointError) as error:
        print(f"annotate: error: {error}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(run_cli())
