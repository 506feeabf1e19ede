"""Images to bytes: JPEG (simplejpeg, several times faster than Pillow for large images), PNG and
WebP (Pillow), base64."""

from __future__ import annotations

import base64
import io

import numpy as np
import simplejpeg
from PIL import Image

JPEG_QUALITY = 90
# PNG is lossless: a quality does not apply. Level 6 is zlib's own default balance of size and time.
PNG_COMPRESS_LEVEL = 6


def to_jpeg(image: np.ndarray, *, quality: int = JPEG_QUALITY) -> bytes:
    return bytes(simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=quality, colorspace="RGB"))


def to_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def to_webp(image: np.ndarray, *, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "WEBP", quality=quality)
    return buffer.getvalue()


def encode_as(image: np.ndarray, image_format: str, *, quality: int) -> bytes:
    """`image` in `image_format` ("jpeg", "png" or "webp"); `quality` is ignored for PNG."""
    if image_format == "jpeg":
        return to_jpeg(image, quality=quality)
    if image_format == "png":
        return to_png(image)
    if image_format == "webp":
        return to_webp(image, quality=quality)
    raise ValueError(f"unknown image format {image_format!r}")


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
