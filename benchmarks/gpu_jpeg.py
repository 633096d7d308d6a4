"""JPEG decoding and resizing on the GPU (nvJPEG through torchvision), for benchmarks/bench_annotate_gpu.py.

NOT YET RUN ON A GPU: written and checked on the CPU (``decode_jpeg``'s CPU path runs the same glue),
it is a measured option of the benchmark, not of the job. It does what :func:`detr.decode_resized`
does for a JPEG - upright by its EXIF orientation, RGB, resized by DETR's rule - with the decode
(``torchvision.io.decode_jpeg(list, device="cuda")``, one call per batch) and the resize on ``device``.
The host reads only each file's header (size and orientation). Differences from the CPU path: the
JPEG is decoded at full size (the CPU path decodes large ones at 1/2-1/8 scale), and the resize
computes in float32 on the GPU; tests/benchmarks/test_gpu_jpeg.py states the tolerance.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

import detr
from detr.image_decoding import DEFAULT_MAX_PIXELS, ImageDecodeError

EXIF_ORIENTATION = 0x0112


def jpeg_header(data: bytes) -> tuple[tuple[int, int], int]:
    """((height, width) as stored, EXIF orientation 1-8) from a JPEG's header, without decoding it."""
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
            return (image.height, image.width), orientation if orientation in range(1, 9) else 1
    except Exception as error:  # noqa: BLE001 - any unreadable header is that object's error
        raise ImageDecodeError(f"not a JPEG: {type(error).__name__}") from None


def upright(image: Tensor, orientation: int) -> Tensor:
    """Tensor[C, H, W] turned upright by its EXIF orientation, as ``PIL.ImageOps.exif_transpose`` does."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1).flip(-2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:
        return image.rot90(-1, (-2, -1))  # 90 degrees clockwise
    if orientation == 7:
        return image.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:
        return image.rot90(1, (-2, -1))
    return image


def decode_resized_jpegs(
    objects: Sequence[bytes],
    device: torch.device | str,
    min_size: int = detr.MIN_SIZE,
    max_size: int = detr.MAX_SIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[tuple[Tensor, tuple[int, int]] | ImageDecodeError]:
    """Decode a batch of JPEGs on ``device`` and resize each by DETR's rule there.

    Returns:
        Per object either (uint8 Tensor[3, h, w] on ``device``, upright (height, width) of the full
        image) or the :class:`ImageDecodeError` that object raised (the batch goes on without it).
    """
    results: list[tuple[Tensor, tuple[int, int]] | ImageDecodeError] = []
    headers = []
    for data in objects:
        try:
            (height, width), orientation = jpeg_header(data)
            if height * width > max_pixels:
                raise ImageDecodeError(f"too many pixels: {width}x{height} > {max_pixels}")
            headers.append(orientation)
            results.append(None)  # type: ignore[arg-type]
        except ImageDecodeError as error:
            headers.append(None)
            results.append(error)
    good = [i for i, error in enumerate(results) if error is None]
    tensors = [torch.frombuffer(bytearray(objects[i]), dtype=torch.uint8) for i in good]
    try:
        decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device) if tensors else []
    except RuntimeError:  # nvJPEG fails a whole batch for one bad image: decode one by one to find it
        decoded = []
        for i, tensor in zip(good, tensors):
            try:
                decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as error:
                decoded.append(None)
                results[i] = ImageDecodeError(f"cannot decode: {str(error).splitlines()[0][:200]}")
    for i, image in zip(good, decoded):
        if image is None:
            continue
        image = upright(image, headers[i])
        size = (int(image.shape[1]), int(image.shape[2]))
        results[i] = (detr.resize_to(image, detr.resized_shape(*size, min_size, max_size)), size)
    return results
