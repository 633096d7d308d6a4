"""``--render N DIR``: a quick look at annotate's output - images with their detections drawn."""

from __future__ import annotations

import posixpath

import fsspec
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from detr import decode_image
from storage import filesystem_for, read_objects


def render_detections(fs: fsspec.AbstractFileSystem, files: list[str], count: int, destination: str) -> list[str]:
    """Draw the first ``count`` successful rows of annotate's Parquet ``files`` (on ``fs``) as PNGs
    with their boxes, labels and scores under ``destination`` (a folder URI); returns the PNGs' URIs."""
    out_fs, out_root = filesystem_for(destination)
    out_fs.makedirs(out_root, exist_ok=True)
    written: list[str] = []
    for path in files:
        with fs.open(path, "rb") as stream:
            rows = pq.read_table(stream, columns=["uri", "detections", "error"]).to_pylist()
        for row in rows:
            if len(written) == count:
                return written
            if row["error"] is not None:
                continue
            content = read_objects([row["uri"]])[0]
            if isinstance(content, Exception):
                continue
            image = Image.fromarray(decode_image(content))
            draw = ImageDraw.Draw(image)
            for detection in row["detections"]:
                x0, y0, x1, y1 = detection["box"]
                draw.rectangle([x0, y0, x1, y1], outline=(255, 40, 40), width=2)
                draw.text((x0 + 3, y0 + 2), f"{detection['label']} {detection['score']:.2f}", fill=(255, 40, 40))
            name = posixpath.splitext(posixpath.basename(row["uri"]))[0] + ".png"
            target = posixpath.join(out_root, f"{len(written):04d}-{name}")
            with out_fs.open(target, "wb") as stream:
                image.save(stream, format="PNG")
            written.append(out_fs.unstrip_protocol(target))
    return written
