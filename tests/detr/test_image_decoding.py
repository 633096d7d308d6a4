"""detr/image_decoding.py: every image mode to upright RGB, every broken file to a one-line reason."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import detr
from detr.image_decoding import ImageDecodeError, decode_image, decode_resized

from images import encode, quadrants


def quadrant_means(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[0] // 2, image.shape[1] // 2
    corners = [image[:h, :w], image[:h, w:], image[h:, :w], image[h:, w:]]
    return np.stack([c.reshape(-1, 3).mean(0) for c in corners])


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width x height`` with a tiny (invalid) body: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_rgb_png_is_exact_and_jpeg_close():
    source = quadrants()
    assert np.array_equal(decode_image(encode(Image.fromarray(source), "PNG")), source)
    decoded = decode_image(encode(Image.fromarray(source), "JPEG", quality=95))
    assert decoded.dtype == np.uint8 and decoded.shape == (60, 80, 3)
    assert np.abs(quadrant_means(decoded) - quadrant_means(source)).max() < 6


@pytest.mark.parametrize("orientation, rotate", [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_gives_the_upright_image(orientation, rotate):
    stored = quadrants(60, 80)  # stored landscape; orientations 6 and 8 display it portrait
    exif = Image.Exif()
    exif[0x0112] = orientation
    decoded = decode_image(encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes()))
    expected = np.rot90(stored, k=rotate)  # what a viewer shows
    assert decoded.shape == expected.shape
    assert np.abs(quadrant_means(decoded) - quadrant_means(expected)).max() < 6


def test_grayscale_becomes_three_equal_channels():
    gray = np.tile(np.linspace(0, 255, 80, dtype=np.uint8), (60, 1))
    decoded = decode_image(encode(Image.fromarray(gray, "L"), "PNG"))
    assert decoded.shape == (60, 80, 3)
    assert all(np.array_equal(decoded[..., channel], gray) for channel in range(3))


def test_cmyk_jpeg_converts_to_rgb():
    source = quadrants()
    decoded = decode_image(encode(Image.fromarray(source).convert("CMYK"), "JPEG", quality=95))
    assert decoded.shape == (60, 80, 3)
    assert np.abs(quadrant_means(decoded) - quadrant_means(source)).max() < 8


def test_sixteen_bit_png_is_scaled_not_clipped():
    values = np.tile(np.linspace(0, 65535, 80).astype(np.uint16), (60, 1))
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    decoded = decode_image(data)
    expected = np.round(values / 257.0).astype(np.uint8)
    assert np.array_equal(decoded[..., 0], expected) and np.array_equal(decoded[..., 2], expected)
    assert decoded.max() == 255 and decoded.min() == 0


def test_palette_png_keeps_its_colours():
    source = quadrants()
    palette_image = Image.fromarray(source).quantize(colors=4)
    assert palette_image.mode == "P"
    assert np.array_equal(decode_image(encode(palette_image, "PNG")), source)


def test_alpha_is_composited_over_white():
    rgba = np.zeros((60, 80, 4), np.uint8)
    rgba[..., :3] = (200, 20, 20)
    rgba[:, :40, 3] = 255  # left half opaque red
    rgba[:, 40:, 3] = 0  # right half transparent
    decoded = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert np.array_equal(decoded[:, :40], np.broadcast_to((200, 20, 20), (60, 40, 3)))
    assert np.array_equal(decoded[:, 40:], np.full((60, 40, 3), 255))
    half = rgba.copy()
    half[..., 3] = 128
    blended = decode_image(encode(Image.fromarray(half, "RGBA"), "PNG"))[0, 0]
    assert np.allclose(blended, np.array([200, 20, 20]) * 128 / 255 + 255 * 127 / 255, atol=1.5)


def test_palette_with_transparent_index_and_gray_alpha():
    palette_image = Image.fromarray(quadrants()).quantize(colors=4)
    transparent_index = palette_image.getpixel((0, 0))  # the red quadrant
    decoded = decode_image(encode(palette_image, "PNG", transparency=transparent_index))
    assert np.array_equal(decoded[0, 0], [255, 255, 255]) and np.array_equal(decoded[-1, 0], [30, 30, 220])
    gray_alpha = Image.merge("LA", [Image.new("L", (8, 8), 50), Image.new("L", (8, 8), 255)])
    assert np.array_equal(decode_image(encode(gray_alpha, "PNG"))[0, 0], [50, 50, 50])


def test_webp_lossless_and_lossy():
    source = quadrants()
    assert np.array_equal(decode_image(encode(Image.fromarray(source), "WEBP", lossless=True)), source)
    lossy = decode_image(encode(Image.fromarray(source), "WEBP", quality=90))
    assert np.abs(quadrant_means(lossy) - quadrant_means(source)).max() < 8


def _jpeg() -> bytes:
    rng = np.random.default_rng(0)
    return encode(Image.fromarray((rng.random((120, 160, 3)) * 255).astype(np.uint8)), "JPEG")


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"just some text, saved as photo.jpg\n", "not an image"),
        (_jpeg()[: len(_jpeg()) // 2], "truncated JPEG"),
        (_jpeg()[:100], "truncated JPEG"),
        (encode(Image.fromarray(quadrants()), "PNG")[:70], "truncated PNG"),
        (encode(Image.fromarray(quadrants()), "WEBP")[:40], "truncated WEBP"),
    ],
    ids=["empty", "text", "jpeg-half", "jpeg-header", "png", "webp"],
)
def test_broken_files_give_one_line_reasons(data, reason):
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data)
    assert caught.value.reason == reason


def test_decompression_bombs_are_refused_before_decoding():
    with pytest.raises(
        ImageDecodeError, match=r"^decompression bomb: 10000000000 pixels exceed the limit of 89478485$"
    ):
        decode_image(png_header_only(100_000, 100_000))  # beyond PIL's own hard limit
    with pytest.raises(ImageDecodeError, match=r"^decompression bomb: 15000x10000 = 150000000 pixels"):
        decode_image(png_header_only(15_000, 10_000))  # between 1x and 2x PIL's limit: ours decides
    small = encode(Image.fromarray(quadrants()), "PNG")
    with pytest.raises(ImageDecodeError, match="80x60 = 4800 pixels exceeds the limit of 4000"):
        decode_image(small, max_pixels=4000)
    assert decode_image(small, max_pixels=4800).shape == (60, 80, 3)


def photo(height: int, width: int, seed: int = 0) -> Image.Image:
    """A photo-like image: smooth gradients, a few sharp-edged blocks and mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=2)
    for _ in range(6):
        top, left = rng.integers(0, height * 3 // 4), rng.integers(0, width * 3 // 4)
        base[top : top + height // 5, left : left + width // 5] = rng.integers(0, 256, 3)
    return Image.fromarray(np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8))


def full_decode_resized(data: bytes, min_size: int, max_size: int):
    rgb = decode_image(data)
    return detr.resize_image(rgb, min_size, max_size), rgb.shape[:2]


def test_large_jpeg_is_decoded_at_reduced_scale_close_to_a_full_decode():
    data = encode(photo(1200, 1600), "JPEG", quality=92)
    resized, size = decode_resized(data, min_size=200, max_size=333)
    expected, expected_size = full_decode_resized(data, 200, 333)
    assert size == expected_size == (1200, 1600)  # boxes are reported in the full image's pixels
    assert resized.shape == expected.shape == (3, 200, 266)
    difference = (resized.float() - expected.float()).abs()
    assert 0 < difference.mean() < 1.5, "a 6x reduction decodes at 1/4 scale: close, not identical"
    exact, _ = decode_resized(data, min_size=200, max_size=333, reduced_jpeg=False)
    assert torch.equal(exact, expected)


def test_reduced_scale_follows_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    data = encode(photo(1200, 1600, seed=1), "JPEG", quality=92, exif=exif)
    resized, size = decode_resized(data, min_size=200, max_size=333)
    expected, expected_size = full_decode_resized(data, 200, 333)
    assert size == expected_size == (1600, 1200)
    assert resized.shape == expected.shape == (3, 266, 200)
    assert (resized.float() - expected.float()).abs().mean() < 1.5


@pytest.mark.parametrize("case", ["png", "small-jpeg"])
def test_other_images_decode_exactly_as_a_full_decode(case):
    if case == "png":
        data, (min_size, max_size) = encode(photo(600, 800), "PNG"), (100, 200)
    else:  # shrinks by less than half: nothing to gain from a reduced decode
        data, (min_size, max_size) = encode(photo(600, 800), "JPEG"), (400, 600)
    resized, size = decode_resized(data, min_size=min_size, max_size=max_size)
    expected, expected_size = full_decode_resized(data, min_size, max_size)
    assert size == expected_size and torch.equal(resized, expected)


@pytest.mark.parametrize(
    "fmt, width, height, expected",
    [
        ("PNG", 20000, 1, (1, 1333)),  # a panorama strip: the short side would round to 0
        ("JPEG", 3000, 1, (1, 1333)),  # ... and a JPEG of it would divide by 0 choosing its reduced scale
        ("JPEG", 1, 3000, (1333, 1)),
        ("JPEG", 4000, 3, (1, 1333)),  # reduced-scale decode of an extreme strip
        ("PNG", 1, 1, (800, 800)),
        ("JPEG", 1, 1, (800, 800)),
    ],
)
def test_degenerate_shapes_resize_to_at_least_one_pixel(fmt, width, height, expected):
    data = encode(Image.new("RGB", (width, height), (200, 40, 40)), fmt)
    resized, size = decode_resized(data, min_size=800, max_size=1333)
    assert size == (height, width) and tuple(resized.shape) == (3, *expected)
    assert (resized.float().mean(dim=(1, 2)) - torch.tensor([200.0, 40.0, 40.0])).abs().max() < 8
    assert detr.resized_shape(height, width, 800, 1333) == expected


def test_only_listed_formats_are_decoded(tmp_path):
    image = Image.fromarray(quadrants())
    for fmt in ("PPM", "TGA", "ICO", "PCX", "SGI"):  # images Pillow reads, but not ones we list
        with pytest.raises(ImageDecodeError) as caught:
            decode_image(encode(image, fmt))
        assert caught.value.reason == "not an image", fmt
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"):
        assert decode_image(encode(image, fmt)).shape == (60, 80, 3), fmt


def test_postscript_named_jpg_is_not_an_image_and_ghostscript_never_runs(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    marker = tmp_path / "ghostscript-ran"
    fake_gs = tmp_path / "bin" / "gs"
    fake_gs.parent.mkdir()
    fake_gs.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    fake_gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_gs.parent}:{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # Pillow looks for gs again and finds ours
    reasons = []
    for data in (
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\nshowpage\n",
        b"%!PS\n%%BoundingBox: 0 0 64 48\n(hello) show\nshowpage\n",
    ):
        with pytest.raises(ImageDecodeError) as caught:
            decode_resized(data, min_size=32, max_size=64)
        reasons.append(caught.value.reason)
    assert not marker.exists(), "Ghostscript was started on untrusted input"
    assert reasons == ["not an image", "not an image"]


def test_camera_formats_decode_upright_first_frame():
    red, blue = Image.new("RGB", (1600, 1200), (200, 30, 30)), Image.new("RGB", (1600, 1200), (30, 30, 200))
    mpo = encode(red, "MPO", save_all=True, append_images=[blue])  # a phone's multi-picture JPEG
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    resized, size = decode_resized(mpo, min_size=200, max_size=333)
    assert size == (1200, 1600) and tuple(resized.shape) == (3, 200, 266)
    assert (resized.float().mean(dim=(1, 2)) - torch.tensor([200.0, 30.0, 30.0])).abs().max() < 4
    progressive = encode(photo(600, 800), "JPEG", progressive=True, quality=90)
    expected, _ = full_decode_resized(encode(photo(600, 800), "PNG"), 200, 333)
    assert (decode_resized(progressive, min_size=200, max_size=333)[0].float() - expected.float()).abs().mean() < 3
    frames = [Image.new("P", (40, 30), index) for index in (1, 2, 3)]
    for frame in frames:
        frame.putpalette([0, 0, 0, 250, 0, 0, 0, 250, 0, 0, 0, 250] + [0] * 756)
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(gif)).n_frames == 3
    assert np.array_equal(decode_image(gif)[0, 0], [250, 0, 0])  # the first frame
