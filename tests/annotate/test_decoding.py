"""jobs/annotate/decoding.py: the CPU stage turns a block of URIs into one prepared row each."""

from __future__ import annotations

import pyarrow as pa
import pytest
from PIL import Image

import detr
from detr.image_decoding import ImageDecodeError, decode_image
from jobs.annotate.decoding import PREPARED_SCHEMA, prepare_images

from images import encode, quadrants


def test_prepare_images_resizes_and_keeps_one_row_per_uri(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "rotated.jpg").write_bytes(encode(Image.fromarray(quadrants(60, 80)), "JPEG", exif=exif.tobytes()))
    (tmp_path / "plain.png").write_bytes(encode(Image.fromarray(quadrants(50, 120)), "PNG"))
    (tmp_path / "empty.jpg").write_bytes(b"")
    uris = [
        f"file://{tmp_path}/rotated.jpg",
        f"file://{tmp_path}/missing.jpg",
        f"file://{tmp_path}/plain.png",
        f"file://{tmp_path}/empty.jpg",
    ]
    table = prepare_images(pa.table({"uri": uris}), min_size=32, max_size=64)
    assert table.schema.equals(PREPARED_SCHEMA)
    rows = table.to_pylist()
    assert [r["uri"] for r in rows] == uris
    rotated, missing, plain, empty = rows
    assert (rotated["width"], rotated["height"], rotated["error"]) == (60, 80, None)
    assert (rotated["resized_height"], rotated["resized_width"]) == detr.resized_shape(80, 60, 32, 64)
    assert len(rotated["pixels"]) == 3 * rotated["resized_height"] * rotated["resized_width"]
    expected = detr.resize_image(decode_image((tmp_path / "plain.png").read_bytes()), 32, 64)
    assert plain["pixels"] == expected.numpy().tobytes()
    assert missing["error"].startswith("unreadable: ") and missing["width"] is None and missing["pixels"] == b""
    assert empty["error"] == "empty file"
    with pytest.raises(ImageDecodeError, match=r"missing\.jpg: unreadable: "):
        prepare_images(pa.table({"uri": uris}), min_size=32, max_size=64, fail_on_error=True)
