"""Pre-processing against transformers' DetrImageProcessor."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import detr
from detr.preprocessing import collate_on

transformers = pytest.importorskip("transformers")
from transformers import DetrImageProcessor  # noqa: E402
from transformers.image_transforms import get_size_with_aspect_ratio  # noqa: E402


def test_resized_shape_matches_reference_rule():
    for height in range(40, 3000, 41):
        for width in range(40, 3000, 59):
            assert detr.resized_shape(height, width) == get_size_with_aspect_ratio((height, width), 800, 1333)
    assert detr.resized_shape(480, 640, 256, 400) == get_size_with_aspect_ratio((480, 640), 256, 400)


def _compare(images):
    expected = DetrImageProcessor()(images=images, return_tensors="pt")
    ours = detr.preprocess(images)
    assert ours.pixel_values.shape == expected["pixel_values"].shape
    torch.testing.assert_close(ours.pixel_values, expected["pixel_values"], atol=1e-5, rtol=0)
    assert torch.equal(ours.pixel_mask, expected["pixel_mask"].bool())


def test_matches_detr_image_processor_on_real_photos(coco_mini):
    files = sorted((coco_mini / "val2017").glob("*.jpg"))[:6]
    _compare([Image.open(f).convert("RGB") for f in files])


def test_matches_detr_image_processor_on_mixed_sizes():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(480, 640), (900, 300), (1200, 1200)]]
    _compare([Image.fromarray(im) for im in images])


def test_inputs_of_every_kind_give_the_same_batch():
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)
    from_array = detr.preprocess([array], 64, 96)
    from_pil = detr.preprocess([Image.fromarray(array)], 64, 96)
    from_tensor = detr.preprocess([torch.from_numpy(array).permute(2, 0, 1)], 64, 96)
    for other in (from_pil, from_tensor):
        assert torch.equal(other.pixel_values, from_array.pixel_values)
    assert from_array.original_sizes.tolist() == [[120, 90]]


def test_padding_is_bottom_right_with_mask():
    small = np.zeros((64, 64, 3), np.uint8)
    wide = np.zeros((64, 128, 3), np.uint8)
    batch = detr.preprocess([small, wide], min_size=64, max_size=128)
    assert batch.pixel_values.shape == (2, 3, 64, 128)
    assert batch.pixel_mask[0, :, :64].all() and not batch.pixel_mask[0, :, 64:].any()
    assert (batch.pixel_values[0, :, :, 64:] == 0).all()


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((10, 10), np.uint8), r"\(H, W, 3\)"),
        (np.zeros((10, 10, 3), np.float32), "uint8"),
        (torch.zeros(10, 10, 3, dtype=torch.uint8), r"\(3, H, W\)"),
        ("image.jpg", "got str"),
    ],
)
def test_bad_images_say_what_was_expected(image, message):
    with pytest.raises(ValueError, match=message):
        detr.preprocess([image])


def test_bad_sizes():
    with pytest.raises(ValueError, match="min_size=900, max_size=800"):
        detr.resized_shape(100, 100, 900, 800)


def _uint8_images(seed: int) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(48, 80), (80, 48), (64, 64)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in shapes]
    return images, [(2 * h, 2 * w) for h, w in shapes]


def test_collate_on_a_device_gives_the_same_batch_as_collate():
    images, sizes = _uint8_images(seed=3)
    expected = detr.collate(images, sizes)
    got = collate_on("cpu", images, sizes)
    assert torch.equal(got.pixel_values, expected.pixel_values)  # same float operations in the same order
    assert torch.equal(got.pixel_mask, expected.pixel_mask) and torch.equal(got.original_sizes, expected.original_sizes)
    with pytest.raises(ValueError, match="2 images and 1 sizes"):
        collate_on("cpu", images[:2], sizes[:1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_collate_on_cuda_normalizes_there_like_collate_on_the_host():
    images, sizes = _uint8_images(seed=4)
    expected = detr.collate(images, sizes)
    got = collate_on("cuda", images, sizes)
    assert got.pixel_values.is_cuda and got.pixel_mask.is_cuda
    torch.testing.assert_close(got.pixel_values.cpu(), expected.pixel_values, atol=1e-6, rtol=0)
    assert torch.equal(got.pixel_mask.cpu(), expected.pixel_mask)


RESIZE_AGAINST_TORCHVISION = """
import numpy as np, torch
import torchvision.transforms.v2.functional as TF
from detr.preprocessing import NATIVE_UINT8_RESIZE, resize_to

rng = np.random.default_rng(0)
shapes = [(1, 1), (1, 900), (900, 1), (480, 640), (427, 640), (2000, 3000)]
shapes += [tuple(int(x) for x in rng.integers(1, 1300, 2)) for _ in range(30)]
different = 0
for i, (height, width) in enumerate(shapes):
    image = torch.from_numpy(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).permute(2, 0, 1)
    if i % 2:
        image = image.contiguous()  # CHW as well as the channels-last view decoding gives
    target = [int(x) for x in rng.integers(1, 1400, 2)] if i % 3 else [800, 1066]
    expected = TF.resize(image, target, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    different += not torch.equal(resize_to(image, tuple(target)), expected)
print(NATIVE_UINT8_RESIZE, different)
"""


@pytest.mark.parametrize("capability", ["native", "default"])
def test_resize_gives_torchvisions_pixels_without_importing_it(capability):
    """Same pixels as torchvision's resize (fine-tuning's), up- and downscaled, on torch's
    vectorised uint8 kernel and on the float path of CPUs without one (forced by
    ATEN_CPU_CAPABILITY=default); and resizing loads no torchvision."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability == "default":
        env["ATEN_CPU_CAPABILITY"] = "default"
    run = subprocess.run([sys.executable, "-c", RESIZE_AGAINST_TORCHVISION], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    native, different = run.stdout.split()
    assert different == "0"
    if capability == "default":
        assert native == "False"
    code = (
        "import sys, torch; from detr.preprocessing import resize_to\n"
        "resize_to(torch.zeros(3, 8, 8, dtype=torch.uint8), (4, 4))\n"
        "print('torchvision' in sys.modules)"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert loaded.stdout.split() == ["False"], loaded.stderr
