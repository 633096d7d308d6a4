"""The annotate job's settings: one frozen dataclass, the only source of defaults, and its parser."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import detr
from detr.image_decoding import FORMATS
from jobs.annotate.listing import DEFAULT_EXTENSIONS
from jobs.cli import HelpFormatter, UserError
from storage import DEFAULT_MAX_OBJECT_BYTES

SAMPLE_IMAGES = Path(__file__).resolve().parent / "sample_images"
DEFAULT_OUTPUT = "./detr-ray-output"
# Images per model call when --batch-size is not given. On CPU, 4 amortizes each call's share of
# the pipeline's per-task work better than 2 (benchmarks/RESULTS.md); GPUs want bigger batches.
CPU_BATCH_SIZE = 4
GPU_BATCH_SIZE = 16


class AnnotateError(UserError):
    """Unusable arguments or cluster: one line for the user."""


@dataclass(frozen=True)
class AnnotateConfig:
    """Everything one run of the job needs; checked on construction."""

    input: str = str(SAMPLE_IMAGES)  # folder/prefix URI or .txt/.parquet manifest
    output: str = DEFAULT_OUTPUT  # folder URI for the Parquet files
    weights: str = "detr-r50"  # anything detr.from_pretrained accepts
    threshold: float = 0.7  # keep detections whose class probability is above this
    batch_size: int | None = None  # images per model call; None: CPU_BATCH_SIZE or GPU_BATCH_SIZE
    actors: str | None = None  # "N" or "MIN,MAX"; None: one per GPU, else 1
    gpus_per_actor: float | None = None  # None: 1 on a GPU cluster, else 0
    wait_for_gpus: float = 0.0  # seconds the first GPU actors may wait for nodes to join
    cpus_per_actor: float | None = None  # None: 1 with GPUs, else all of a node's CPUs but one (see actor_plan)
    precision: str = "auto"  # one of detr.PRECISIONS
    min_size: int = detr.MIN_SIZE  # resize so the shorter side is this ...
    max_size: int = detr.MAX_SIZE  # ... unless the longer side would exceed this
    limit: int | None = None  # annotate at most this many images not yet in OUTPUT
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS  # lower case, no dot
    manifest_column: str = "uri"
    rows_per_file: int = 1000
    render_count: int = 0  # draw this many annotated images as PNGs ...
    render_dir: str | None = None  # ... under this folder URI
    full_jpeg_decode: bool = False
    fail_on_error: bool = False
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES  # larger objects become error rows, unread

    def __post_init__(self) -> None:
        for name in ("batch_size", "limit", "rows_per_file", "max_object_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise AnnotateError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if not 0.0 <= self.threshold < 1.0:
            raise AnnotateError(f"--threshold must be in [0, 1), got {self.threshold}")
        if self.min_size < 1 or self.max_size < self.min_size:
            raise AnnotateError(f"need 1 <= --min-size <= --max-size, got {self.min_size} and {self.max_size}")
        if not self.extensions:
            raise AnnotateError("--extensions: no extension given")
        if self.wait_for_gpus < 0:
            raise AnnotateError(f"--wait-for-gpus must be >= 0 seconds, got {self.wait_for_gpus:g}")
        if self.render_count < 0 or (self.render_count > 0) != (self.render_dir is not None):
            raise AnnotateError(f"--render N DIR: N must be a positive integer, got {self.render_count}")
        if self.precision not in detr.PRECISIONS:
            raise AnnotateError(f"--precision must be one of {detr.PRECISIONS}, got {self.precision!r}")


def build_parser() -> argparse.ArgumentParser:
    """The job's command line (also read by the cluster manifests' tests)."""
    d = AnnotateConfig
    parser = argparse.ArgumentParser(
        prog="python -m jobs.annotate",
        description="Detect objects in every image under INPUT with DETR on a Ray cluster and write Parquet to OUTPUT.",
        epilog=(
            "Object storage: s3:// (and S3-compatible stores through AWS_ENDPOINT_URL), gs://, any fsspec URI; "
            "credentials come from the usual environment/config chain, never from arguments. "
            "Re-running with the same OUTPUT resumes: images already written are skipped. "
            f"Every object listed gets one row; only {', '.join(FORMATS)} images are decoded (GIF, TIFF: the first "
            "frame; JPEG includes MPO), anything else is an error row 'not an image', and no external program "
            "is ever run on an object. "
            "Exit codes: 0 done, 1 --fail-on-error stopped at a bad image, 2 unusable arguments, input or weights. "
            "COCO results JSON from OUTPUT: python -m jobs.coco_export OUTPUT ANNOTATIONS.json RESULTS.json."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "input",
        nargs="?",
        default=d.input,
        help="folder or prefix URI read recursively (local path, file://, s3://, gs://), or a manifest "
        "of URIs: a .txt file (one per line) or a .parquet file (see --manifest-column); "
        "default: the bundled sample images",
    )
    parser.add_argument("output", nargs="?", default=d.output, help="folder URI for the Parquet files")
    parser.add_argument(
        "--weights",
        default=d.weights,
        help=f"{', '.join(n for n in detr.REGISTRY if '://' not in n)} (downloaded once), "
        f"{', '.join(n for n in detr.REGISTRY if '://' in n)}, "
        "or a checkpoint path/URI (on multi-node clusters, a URI every node can read)",
    )
    parser.add_argument(
        "--threshold", type=float, default=d.threshold, help="keep detections with a class probability above this"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help=f"images per model call (default: {GPU_BATCH_SIZE} on GPU, {CPU_BATCH_SIZE} on CPU); "
        "split further by aspect ratio",
    )
    parser.add_argument(
        "--actors",
        default=d.actors,
        help="model actors: N for a fixed pool or MIN,MAX to autoscale (default: one per GPU on a GPU cluster, else 1)",
    )
    parser.add_argument(
        "--gpus-per-actor",
        type=float,
        default=d.gpus_per_actor,
        help="GPUs per model actor, fractions allowed "
        "(default: 1 when the cluster has GPUs or --wait-for-gpus is given, else 0: CPU inference)",
    )
    parser.add_argument(
        "--wait-for-gpus",
        type=float,
        default=d.wait_for_gpus,
        metavar="SECONDS",
        help="for clusters whose GPU workers start on demand (KubeRay minReplicas 0, autoscaling "
        "node types): accept GPU actors although no GPU node is up yet, and fail if the "
        "first actors have not started (node added, weights loaded) within SECONDS; "
        "0 = GPUs must be up when the job starts",
    )
    parser.add_argument(
        "--cpus-per-actor",
        type=float,
        default=d.cpus_per_actor,
        help="CPUs reserved per model actor; torch uses that many threads (default: 1 with GPUs; "
        "on CPU, all CPUs of the largest node but one are reserved, the one left for scheduling reading "
        "and decoding, and torch uses all of the node's cores: decoding needs a small fraction of one)",
    )
    parser.add_argument(
        "--precision",
        choices=detr.PRECISIONS,
        default=d.precision,
        help="inference precision: auto = fp32 on CPU, bf16 on GPU (fp16 where bf16 is unsupported)",
    )
    parser.add_argument("--min-size", type=int, default=d.min_size, help="resize so the shorter side is this ...")
    parser.add_argument("--max-size", type=int, default=d.max_size, help="... unless the longer side would exceed this")
    parser.add_argument(
        "--limit", type=int, default=d.limit, metavar="N", help="annotate at most N images not yet in OUTPUT"
    )
    parser.add_argument(
        "--extensions",
        default=",".join(d.extensions),
        help="comma-separated file extensions to list under a folder/prefix (case-insensitive)",
    )
    parser.add_argument("--manifest-column", default=d.manifest_column, help="the URI column of a .parquet manifest")
    parser.add_argument(
        "--rows-per-file",
        type=int,
        default=d.rows_per_file,
        help="rows per Parquet file (a killed job redoes at most this many images per writer)",
    )
    parser.add_argument(
        "--render",
        nargs=2,
        default=None,
        metavar=("N", "DIR"),
        help="also draw boxes, labels and scores on the first N annotated images as PNGs under DIR (a URI)",
    )
    parser.add_argument(
        "--full-jpeg-decode",
        action="store_true",
        help="decode every pixel of large JPEGs before resizing, as DetrImageProcessor does; by "
        "default a JPEG at least twice the model's input size is decoded at 1/2-1/8 scale "
        "(~6x faster for 12-megapixel photos, ~0.2/255 mean pixel difference)",
    )
    parser.add_argument(
        "--max-object-bytes",
        type=int,
        default=d.max_object_bytes,
        metavar="BYTES",
        help=f"objects larger than this ({d.max_object_bytes / 2**20:g} MiB by default) become error rows 'too large' "
        "without being read",
    )
    parser.add_argument(
        "--fail-on-error",
        action="store_true",
        help="stop the job (exit 1) at the first image that cannot be read or decoded, instead of writing an error row",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> AnnotateConfig:
    """The parsed command line as an :class:`AnnotateConfig` (raises :class:`AnnotateError`)."""
    if args.render is not None and (not args.render[0].isdigit() or int(args.render[0]) < 1):
        raise AnnotateError(f"--render N DIR: N must be a positive integer, got {args.render[0]!r}")
    extensions = tuple(e.strip().lower().lstrip(".") for e in args.extensions.split(",") if e.strip())
    if not extensions:
        raise AnnotateError(f"--extensions {args.extensions!r}: no extension given")
    return AnnotateConfig(
        input=args.input,
        output=args.output,
        weights=args.weights,
        threshold=args.threshold,
        batch_size=args.batch_size,
        actors=args.actors,
        gpus_per_actor=args.gpus_per_actor,
        wait_for_gpus=args.wait_for_gpus,
        cpus_per_actor=args.cpus_per_actor,
        precision=args.precision,
        min_size=args.min_size,
        max_size=args.max_size,
        limit=args.limit,
        extensions=extensions,
        manifest_column=args.manifest_column,
        rows_per_file=args.rows_per_file,
        render_count=int(args.render[0]) if args.render else 0,
        render_dir=args.render[1] if args.render else None,
        full_jpeg_decode=args.full_jpeg_decode,
        fail_on_error=args.fail_on_error,
        max_object_bytes=args.max_object_bytes,
    )


def parse_config(argv: list[str] | None = None) -> AnnotateConfig:
    """``build_parser`` + :func:`config_from_args` (``sys.argv[1:]`` when ``argv`` is None)."""
    return config_from_args(build_parser().parse_args(argv))
