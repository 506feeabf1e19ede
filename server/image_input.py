"""An `image` field → the RGB pixels img2img starts from, or a 422 that says what is wrong.

Accepted (docs/contract.md, img2img): base64, standard or URL-safe, padding optional, whitespace
ignored; a `data:image/…;base64,` URI; an http(s) URL only when `limits.image_url_fetch` is on
(server/image_fetch.py). Decoded with Pillow as ComfyUI's LoadImage does: EXIF orientation applied,
32-bit integer ("I") pixels scaled by 1/255, alpha dropped (`convert("RGB")`, not composited), the
first frame of an animation. A longer side above `limits.img2img_max_side` is scaled down (Lanczos)
before the generator's crop to a multiple of 8. All of it runs before any credit is reserved.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.img2img import MIN_SIDE, cropped_size
from server.config import LimitSettings
from server.errors import InvalidRequest
from server.image_fetch import UrlFetcher

# Pillow's JPEG opener also takes the MPO files many phone cameras write (a JPEG with more appended).
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
URLS_OFF = "image URLs are not fetched by this server; send the image as base64"

_DATA_URI = re.compile(r"data:image/[a-z0-9.+-]+(?:;[a-z0-9=._+-]+)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
_BASE64 = re.compile(r"[A-Za-z0-9+/]*")


@dataclass(frozen=True)
class InputImage:
    pixels: np.ndarray  # HxWx3 uint8, after any downscale; the generator crops it
    width: int  # the output size: the pixels' size cropped to a multiple of 8
    height: int


def read_image(value: str, limits: LimitSettings, *, fetcher: UrlFetcher | None = None) -> InputImage:
    """Decode an `image` field; InvalidRequest (422) naming the problem otherwise. Blocking: run it in
    a worker thread."""
    text = value.strip()
    if re.match(r"https?://", text, re.IGNORECASE):
        if not limits.image_url_fetch:
            raise InvalidRequest(URLS_OFF)
        fetcher = fetcher or UrlFetcher(
            max_bytes=limits.image_max_bytes, allowed_hosts=tuple(limits.image_url_hosts)
        )
        data = fetcher.fetch(text)
    else:
        data = decode_base64(text, max_bytes=limits.image_max_bytes)
    return decode_pixels(data, limits)


def decode_base64(text: str, *, max_bytes: int) -> bytes:
    """Base64 (standard or URL-safe, padding optional, whitespace ignored), or a data:image URI."""
    if text[:5].lower() == "data:":
        match = _DATA_URI.match(text)
        if match is None:
            raise InvalidRequest("image: a data URI must be data:image/<type>;base64,<data>")
        text = text[match.end() :]
    compact = _WHITESPACE.sub("", text).rstrip("=").replace("-", "+").replace("_", "/")
    if not compact:
        raise InvalidRequest("image: is empty")
    # Checked before decoding: 4 characters carry 3 bytes.
    if len(compact) * 3 // 4 > max_bytes:
        raise InvalidRequest(f"image: more than the limit of {max_bytes} bytes")
    if _BASE64.fullmatch(compact) is None or len(compact) % 4 == 1:
        raise InvalidRequest(
            "image: is not base64 (standard or URL-safe), a data:image/...;base64, URI or an http(s) URL"
        )
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except binascii.Error:
        raise InvalidRequest("image: is not valid base64") from None


def decode_pixels(data: bytes, limits: LimitSettings) -> InputImage:
    if not data:
        raise InvalidRequest("image: is empty")
    if len(data) > limits.image_max_bytes:
        raise InvalidRequest(f"image: more than the limit of {limits.image_max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            # Pillow warns about what it skips in a malformed file (and about pixel counts our own
            # limit below is stricter on): the client's file, not the operator's concern.
            warnings.simplefilter("ignore")
            opened = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = opened.size
            if width < 1 or height < 1:
                raise InvalidRequest(f"image: has no pixels ({width}x{height})")
            if width * height > limits.image_max_pixels:
                raise InvalidRequest(
                    f"image: {width}x{height} is {width * height / 1e6:.1f} MP, more than the limit of "
                    f"{limits.image_max_pixels / 1e6:g} MP"
                )
            if min(width, height) < MIN_SIDE:
                raise InvalidRequest(f"image: {width}x{height} has a side under {MIN_SIDE} px")
            opened.load()  # the first frame; an animation's others are never decoded
            image = _to_rgb(ImageOps.exif_transpose(opened))
    except InvalidRequest:
        raise
    except Image.DecompressionBombError:
        # Pillow refuses twice its own pixel limit before our check can read the size: the same
        # refusal, in our words.
        raise InvalidRequest(f"image: more than the limit of {limits.image_max_pixels / 1e6:g} MP") from None
    except Exception as exc:
        # Pillow's plugins raise many types on malformed input (OSError, SyntaxError, struct.error,
        # IndexError, ...): whichever, the bytes sent are not a usable image, which is the client's 422.
        raise InvalidRequest(
            f"image: could not be decoded as JPEG, PNG, WebP, GIF, BMP or TIFF ({_reason(exc)})"
        ) from None
    image = _bounded(image, limits.img2img_max_side)
    if min(image.size) < MIN_SIDE:
        # Wide enough as sent, too thin once scaled down: say both sizes, or the client sees a size
        # it never sent.
        raise InvalidRequest(
            f"image: {width}x{height} is {image.width}x{image.height} once its longer side is scaled "
            f"to {limits.img2img_max_side} px, a side under {MIN_SIDE} px"
        )
    width, height = image.size
    out_width, out_height = cropped_size(width, height)
    return InputImage(np.asarray(image, dtype=np.uint8), out_width, out_height)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I;16"):
        image = image.convert("I")
    if image.mode == "I":
        # 32-bit integer pixels are scaled by 1/255 before the RGB conversion, as LoadImage does.
        image = image.point(lambda value: value * (1 / 255))
    return image.convert("RGB")


def _bounded(image: Image.Image, max_side: int) -> Image.Image:
    width, height = image.size
    longer = max(width, height)
    if longer <= max_side:
        return image
    scale = max_side / longer
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image in one of these formats"  # Pillow's own text names a memory address
    text = str(exc).split("\n", 1)[0]
    return (text[:120] + "…") if len(text) > 120 else (text or type(exc).__name__)
