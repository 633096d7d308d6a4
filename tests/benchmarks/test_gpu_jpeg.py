"""benchmarks/gpu_jpeg.py: JPEG decode + resize on a device against the job's CPU decoding.

On the CPU ``decode_jpeg`` runs libjpeg-turbo, so the glue (headers, EXIF orientation, the resize
rule, per-image errors) is checked here; the gpu-marked test runs the same comparison with nvJPEG.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from detr.image_decoding import ImageDecodeError, decode_resized

from images import encode, quadrants

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from gpu_jpeg import decode_resized_jpegs, upright  # noqa: E402

SAMPLE_PHOTOS = sorted((Path(__file__).resolve().parents[2] / "jobs" / "annotate" / "sample_images").glob("*.jpg"))


def _with_orientation(data: bytes, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    with Image.open(io.BytesIO(data)) as image:
        return encode(image, "JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_upright_turns_like_pillows_exif_transpose(orientation):
    stored = Image.fromarray(quadrants(6, 8))
    exif = stored.getexif()
    exif[0x0112] = orientation
    stored.info["exif"] = exif.tobytes()
    want = np.asarray(ImageOps.exif_transpose(stored))
    got = upright(torch.from_numpy(np.asarray(stored).copy()).permute(2, 0, 1), orientation).permute(1, 2, 0)
    assert np.array_equal(got.numpy(), want)


def _compare_with_cpu_decoding(device: str) -> None:
    photos = [path.read_bytes() for path in SAMPLE_PHOTOS[:3]]
    objects = [*photos, _with_orientation(photos[0], 6), b"not a jpeg"]
    results = decode_resized_jpegs(objects, device, min_size=320, max_size=533)
    assert isinstance(results[-1], ImageDecodeError)
    for data, result in zip(objects[:-1], results[:-1]):
        want, want_size = decode_resized(data, min_size=320, max_size=533, reduced_jpeg=False)
        got, got_size = result
        assert got.device.type == torch.device(device).type and got.dtype == torch.uint8
        assert got_size == want_size and got.shape == want.shape
        difference = (got.cpu().float() - want.float()).abs()
        if device == "cpu":  # torchvision's libjpeg-turbo and Pillow's, same resize: the same pixels
            assert difference.max() == 0
            continue
        # nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by a level or two; the GPU resize
        # rounds once from float32. The mean bounds systematic error, the 99th percentile stray pixels.
        assert difference.mean() < 1.5 and difference.flatten().quantile(0.99) <= 12, (difference.mean(), device)


def test_cpu_glue_gives_the_jobs_decoding():
    _compare_with_cpu_decoding("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvjpeg_gives_the_jobs_decoding():
    _compare_with_cpu_decoding("cuda")
