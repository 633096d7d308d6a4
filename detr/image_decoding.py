"""From an object's bytes to an upright RGB image, or a one-line reason why not.

Every kind of input a bucket of "images" really holds is mapped to one of two outcomes:

* an ``uint8`` array ``(H, W, 3)`` in the orientation a viewer shows (EXIF ``Orientation``
  applied), whatever the file's mode: grayscale, 16-bit grayscale (scaled, not clipped),
  CMYK, palette, bilevel, or with alpha (composited over white, so transparent regions do
  not turn into whatever colour the encoder left under them);
* :class:`ImageDecodeError` whose ``reason`` is one short line: ``empty file``,
  ``not an image``, ``truncated JPEG`` (or PNG, ...), ``decompression bomb: ...``,
  ``unreadable: ...``.

Only the formats in :data:`FORMATS` are decoded, whatever the file is named: anything else
(PostScript, PDF, SVG, ...) is ``not an image``. Pillow would otherwise try every plugin it has,
and its EPS plugin runs Ghostscript on the file: an external interpreter on untrusted input.
Degenerate shapes (1 pixel high or wide, 1x1, any aspect ratio) decode and resize to at least
1 pixel a side.

:func:`decode_resized` is what batch inference wants: decode and resize to the model's input
size in one step, large JPEGs at libjpeg's reduced scale.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import one_line

if TYPE_CHECKING:
    import torch

# PIL's own default limit (~89.5 megapixels, ~256 MiB of RGB): beyond it, a small file that
# claims huge dimensions would make a decode worker allocate gigabytes.
DEFAULT_MAX_PIXELS = 89_478_485

# Pillow's names for the formats we decode; "JPEG" includes MPO, the multi-picture JPEG of many
# phones and cameras (Pillow opens it through the JPEG plugin and reports "MPO"; first picture).
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_JPEG_FORMATS = ("JPEG", "MPO")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
_ORIENTATION = 0x0112  # EXIF tag
_MAGIC = (
    (b"\xff\xd8", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


class ImageDecodeError(ValueError):
    """An object that is not a usable image; ``reason`` is the one-line explanation."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an encoded image into an upright RGB array.

    Args:
        data: the file's bytes, in one of :data:`FORMATS` (GIF and TIFF: the first frame).
        max_pixels: images claiming more pixels than this are rejected before decoding.
    Returns:
        uint8 array ``(H, W, 3)``; ``H, W`` are the EXIF-transposed height and width.
    Raises:
        ImageDecodeError: with a one-line ``reason``.
    """
    return _decoded_rgb(_open(data, max_pixels), data)


def decode_resized(
    data: bytes, *, min_size: int, max_size: int, max_pixels: int = DEFAULT_MAX_PIXELS, reduced_jpeg: bool = True
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Decode an image and resize it by DETR's rule (:func:`detr.resized_shape`).

    A JPEG that shrinks to half its size or less is decoded at a reduced scale (libjpeg's
    1/2, 1/4 or 1/8, never below the target): a 4032x3024 photo resized for the model
    decodes about 6x faster and holds a quarter of the memory, and the result differs from
    a full decode + resize by ~0.2 of 255 per pixel on average. ``reduced_jpeg=False`` decodes
    every pixel, as ``DetrImageProcessor`` does.

    Returns:
        uint8 Tensor[3, h, w] for the model and the upright (height, width) of the full image,
        in which boxes are reported.
    Raises:
        ImageDecodeError: with a one-line ``reason``.
    """
    # Imported here: torch loads only where images are resized, not where FORMATS or the errors are read.
    from .preprocessing import resize_to, resized_shape

    image = _open(data, max_pixels)
    height, width = _upright_size(image)
    target = resized_shape(height, width, min_size, max_size)
    if reduced_jpeg and image.format in _JPEG_FORMATS and min(target) * 2 <= min(height, width):
        scale = min(target) / min(height, width)
        # draft() picks the largest DCT reduction that keeps the image at least this size (stored orientation).
        image.draft(None, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
    return resize_to(_decoded_rgb(image, data), target), (height, width)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """The image's header read (nothing decoded yet), with the decompression-bomb limit applied."""
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with warnings.catch_warnings():
            # Our own limit below decides; PIL's warning between 1x and 2x its limit is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image") from None
    except Image.DecompressionBombError as error:  # beyond 2x PIL's limit: refused while reading the header
        claimed = re.search(r"\((\d+) pixels\)", str(error))
        pixels = claimed.group(1) if claimed else "too many"
        raise ImageDecodeError(f"decompression bomb: {pixels} pixels exceed the limit of {max_pixels}") from None
    except Exception as error:  # noqa: BLE001 - a broken header can raise anything; say what
        raise ImageDecodeError(_failure_reason(data, None, error)) from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"decompression bomb: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
        )
    return image


def _decoded_rgb(image: Image.Image, data: bytes) -> np.ndarray:
    try:
        image.load()
    except Exception as error:  # noqa: BLE001 - classify below; never let one file kill a batch
        raise ImageDecodeError(_failure_reason(data, image.format, error)) from None
    return to_rgb_array(_upright(image))


def _upright_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) once EXIF orientation is applied: orientations 5-8 turn the image a quarter."""
    try:
        quarter_turn = image.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8)
    except Exception:  # noqa: BLE001 - a malformed EXIF block is ignored, as _upright does
        quarter_turn = False
    return (image.width, image.height) if quarter_turn else (image.height, image.width)


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """uint8 ``(H, W, 3)`` from a loaded image of any mode (16-bit scaled, alpha over white)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float32)
        gray = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)  # 65535 -> 255
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if image.mode == "F":
        gray = np.clip(np.round(np.asarray(image)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a malformed EXIF block is not worth losing the image over
        return image


def _failure_reason(data: bytes, image_format: str | None, error: Exception) -> str:
    """``truncated <FORMAT>`` when the file ends early, else ``unreadable: <decoder message>``."""
    image_format = image_format or _sniff_format(data)
    message = one_line(error)
    truncated_signs = ("truncated", "broken data stream", "premature end", "unexpected end")
    riff_short = image_format == "WEBP" and int.from_bytes(data[4:8], "little") + 8 > len(data)
    if isinstance(error, EOFError) or riff_short or any(sign in message.lower() for sign in truncated_signs):
        return f"truncated {image_format or 'image'}"
    return f"unreadable: {message}"


def _sniff_format(data: bytes) -> str | None:
    """The format a file's magic bytes announce (for files too broken for PIL to say)."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return "WEBP" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else None
