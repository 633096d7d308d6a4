"""A synthetic detection dataset: coloured shapes on noisy backgrounds, in COCO format.

Each image holds up to ``max_objects`` filled shapes (square, circle, triangle), each class
in its own colour, on uniform noise; about one image in ten is empty (a negative). Category
ids are deliberately not COCO's (10, 20, 30), so a model trained on it proves that arbitrary
ids map to contiguous class indices and back.

Writes ``OUTPUT_URI/images/*.png`` and ``OUTPUT_URI/annotations.json`` to any fsspec URI::

    python -m jobs.synthetic_shapes s3://bucket/shapes --images 200 --seed 0
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
from PIL import Image, ImageDraw

from jobs import cli


@dataclass(frozen=True)
class ShapeClass:
    category_id: int
    name: str
    rgb: tuple[int, int, int]


# Distinct hues far from the grey noise, so colour alone tells the classes apart.
SHAPE_CLASSES: tuple[ShapeClass, ...] = (
    ShapeClass(10, "square", (220, 40, 40)),
    ShapeClass(20, "circle", (40, 200, 60)),
    ShapeClass(30, "triangle", (50, 80, 230)),
)


@dataclass(frozen=True)
class ShapesConfig:
    image_size: int = 128  # square images, in pixels
    min_object_size: int = 28  # bounding-box side of a shape, in pixels
    max_object_size: int = 60
    max_objects: int = 3  # per image
    empty_fraction: float = 0.1  # share of images without any shape
    max_overlap_iou: float = 0.2  # placements overlapping an earlier shape more than this are redrawn

    def __post_init__(self) -> None:
        if not 0 < self.min_object_size <= self.max_object_size <= self.image_size:
            raise ValueError(
                f"need 0 < min_object_size <= max_object_size <= image_size, got {self.min_object_size}, "
                f"{self.max_object_size}, {self.image_size}"
            )
        if self.max_objects < 1:
            raise ValueError(f"max_objects must be at least 1, got {self.max_objects}")
        if not 0.0 <= self.empty_fraction < 1.0:
            raise ValueError(f"empty_fraction must be in [0, 1), got {self.empty_fraction}")


def _iou_xywh(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def draw_image(rng: np.random.Generator, config: ShapesConfig) -> tuple[Image.Image, list[dict]]:
    """One image and its objects.

    Returns:
        The RGB image and a list of ``{"category_id", "bbox" (absolute xywh pixels), "area"}``.
    """
    size = config.image_size
    base = rng.integers(60, 180)
    noise = rng.normal(base, 30, size=(size, size, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(noise, "RGB")
    draw = ImageDraw.Draw(image)
    objects: list[dict] = []
    count = 0 if rng.random() < config.empty_fraction else int(rng.integers(1, config.max_objects + 1))
    for _ in range(count):
        for _attempt in range(20):
            side = int(rng.integers(config.min_object_size, config.max_object_size + 1))
            x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            box = [x, y, side, side]
            if all(_iou_xywh(box, o["bbox"]) <= config.max_overlap_iou for o in objects):
                break
        else:
            continue  # no free spot: the image gets fewer shapes
        shape = SHAPE_CLASSES[int(rng.integers(len(SHAPE_CLASSES)))]
        jitter = rng.integers(-20, 21, size=3)
        colour = tuple(int(c) for c in np.clip(np.array(shape.rgb) + jitter, 0, 255))
        corners = [x, y, x + side - 1, y + side - 1]  # PIL draws both end pixels
        if shape.name == "square":
            draw.rectangle(corners, fill=colour)
            area = float(side * side)
        elif shape.name == "circle":
            draw.ellipse(corners, fill=colour)
            area = float(np.pi * side * side / 4)
        else:
            draw.polygon([(x, y + side - 1), (x + side - 1, y + side - 1), (x + (side - 1) / 2, y)], fill=colour)
            area = float(side * side / 2)
        objects.append({"category_id": shape.category_id, "bbox": [float(v) for v in box], "area": area})
    return image, objects


def generate(output_uri: str, num_images: int, seed: int = 0, config: ShapesConfig = ShapesConfig()) -> dict:
    """Write ``num_images`` PNGs under ``output_uri/images/`` and ``output_uri/annotations.json``.

    Returns:
        The COCO instances dict that was written.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    rng = np.random.default_rng(seed)
    root = output_uri.rstrip("/")
    fs, images_path = fsspec.core.url_to_fs(f"{root}/images")
    fs.makedirs(images_path, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        image, objects = draw_image(rng, config)
        file_name = f"{image_id:06d}.png"
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        with fs.open(f"{images_path}/{file_name}", "wb") as f:
            f.write(buffer.getvalue())
        images.append({"id": image_id, "file_name": file_name, "height": config.image_size, "width": config.image_size})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0, **obj})
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c.category_id, "name": c.name, "supercategory": "shape"} for c in SHAPE_CLASSES],
    }
    with fsspec.open(f"{root}/annotations.json", "w") as f:
        json.dump(coco, f)
    return coco


@dataclass(frozen=True)
class GenerateConfig:
    output: str  # folder URI
    images: int = 200
    seed: int = 0
    shapes: ShapesConfig = ShapesConfig()


@dataclass(frozen=True)
class Generated:
    output: str
    coco: dict

    def summary(self) -> str:
        return f"wrote {len(self.coco['images'])} images with {len(self.coco['annotations'])} shapes to {self.output}"


def build_parser() -> argparse.ArgumentParser:
    """The job's command line (also read by the cluster manifests' tests)."""
    parser = argparse.ArgumentParser(prog="python -m jobs.synthetic_shapes", description=__doc__.split("\n")[0])
    parser.add_argument("output", help="output folder URI (local path, s3://..., any fsspec URI)")
    parser.add_argument("--images", type=int, default=GenerateConfig.images, help="number of images to draw")
    parser.add_argument(
        "--seed", type=int, default=GenerateConfig.seed, help="random seed; the same seed gives the same dataset"
    )
    parser.add_argument("--image-size", type=int, default=ShapesConfig.image_size, help="image side in pixels")
    parser.add_argument("--min-object-size", type=int, default=ShapesConfig.min_object_size, help="smallest shape side")
    parser.add_argument("--max-object-size", type=int, default=ShapesConfig.max_object_size, help="largest shape side")
    parser.add_argument("--max-objects", type=int, default=ShapesConfig.max_objects, help="most shapes in one image")
    return parser


def config_from_args(args: argparse.Namespace) -> GenerateConfig:
    try:
        shapes = ShapesConfig(
            image_size=args.image_size,
            min_object_size=args.min_object_size,
            max_object_size=args.max_object_size,
            max_objects=args.max_objects,
        )
    except ValueError as error:
        raise cli.UserError(str(error)) from None
    if args.images < 1:
        raise cli.UserError(f"--images must be at least 1, got {args.images}")
    return GenerateConfig(args.output, args.images, args.seed, shapes)


def main(config: GenerateConfig) -> Generated:
    return Generated(config.output, generate(config.output, config.images, config.seed, config.shapes))


def run(argv: Sequence[str] | None = None) -> int:
    """``python -m jobs.synthetic_shapes``: the exit status."""
    return cli.run("synthetic_shapes", build_parser, config_from_args, main, argv)
