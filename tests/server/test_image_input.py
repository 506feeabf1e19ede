"""The `image` field of img2img: every accepted spelling, every decoding rule, every refusal (real Pillow)."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server.config import LimitSettings
from server.errors import InvalidRequest
from server.image_input import URLS_OFF, decode_pixels, read_image

IMAGES = Path(__file__).parent.parent / "data" / "images"
LIMITS = LimitSettings()


def b64(name: str) -> str:
    return base64.b64encode((IMAGES / name).read_bytes()).decode()


def refused(value: str, limits: LimitSettings = LIMITS) -> str:
    with pytest.raises(InvalidRequest) as caught:
        read_image(value, limits)
    assert caught.value.status_code == 422
    return caught.value.message


@pytest.mark.parametrize(
    "name", ["landscape.png", "landscape.webp", "landscape.bmp", "landscape.tiff", "landscape.jpg"]
)
def test_each_format_decodes_to_the_same_pixels(name: str) -> None:
    image = read_image(b64(name), LIMITS)
    assert image.pixels.shape == (72, 96, 3) and image.pixels.dtype == np.uint8
    assert (image.width, image.height) == (96, 72)
    expected = np.asarray(Image.open(IMAGES / "landscape.png").convert("RGB")).astype(np.int16)
    tolerance = 8 if name.endswith(".jpg") else 0
    assert np.abs(image.pixels.astype(np.int16) - expected).max() <= tolerance


def test_every_base64_spelling_gives_the_same_image() -> None:
    raw = (IMAGES / "landscape.png").read_bytes()
    standard = base64.b64encode(raw).decode()
    urlsafe = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    wrapped = "\n".join(standard[i : i + 76] for i in range(0, len(standard), 76))
    spellings = [
        standard,
        urlsafe,
        wrapped,
        f"  {standard}\r\n",
        f"data:image/png;base64,{standard}",
        f"DATA:image/PNG;base64,{urlsafe}",
    ]
    first = read_image(spellings[0], LIMITS).pixels
    for spelling in spellings[1:]:
        np.testing.assert_array_equal(read_image(spelling, LIMITS).pixels, first)


def test_exif_orientation_is_applied() -> None:
    with Image.open(IMAGES / "rotated_exif.jpg") as stored:
        assert stored.size == (72, 96)  # portrait on disk
    image = read_image(b64("rotated_exif.jpg"), LIMITS)
    assert image.pixels.shape == (72, 96, 3)
    # Red grows to the right, green downwards, as in the landscape it was made from.
    assert image.pixels[36, 90, 0] > image.pixels[36, 5, 0] + 150
    assert image.pixels[68, 48, 1] > image.pixels[3, 48, 1] + 150


def test_alpha_is_dropped_not_composited() -> None:
    image = read_image(b64("transparent.png"), LIMITS)
    expected = np.asarray(Image.open(IMAGES / "transparent.png"))[..., :3]
    np.testing.assert_array_equal(image.pixels, expected)  # colour kept under alpha 0


def test_only_the_first_frame_of_an_animation() -> None:
    image = read_image(b64("two_frames.gif"), LIMITS)
    assert tuple(image.pixels[10, 10]) == (255, 0, 0)


def test_16_bit_pixels_are_scaled_by_one_255th_as_loadimage_does() -> None:
    image = read_image(b64("gray16.png"), LIMITS)
    source = np.asarray(Image.open(IMAGES / "gray16.png")).astype(np.int64)
    expected = np.clip(source // 255, 0, 255)  # value · 1/255, truncated, saturating at 255
    assert np.abs(image.pixels[..., 0].astype(np.int64) - expected).max() <= 1
    assert (image.pixels[..., 0] == image.pixels[..., 2]).all()


def test_a_longer_side_above_the_limit_is_scaled_down_before_the_crop() -> None:
    limits = LimitSettings(img2img_max_side=160)
    big = Image.new("RGB", (300, 170), (200, 100, 50))
    buffer = io.BytesIO()
    big.save(buffer, "PNG")
    image = decode_pixels(buffer.getvalue(), limits)
    assert image.pixels.shape == (91, 160, 3)  # 170 · 160/300 = 90.7 → 91
    assert (image.width, image.height) == (160, 88)  # the output: cropped to multiples of 8


def test_the_output_size_is_the_crop_to_multiples_of_8() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (131, 77)).save(buffer, "PNG")
    image = decode_pixels(buffer.getvalue(), LIMITS)
    assert (image.width, image.height) == (128, 72)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("not base64 at all!", "is not base64"),
        ("QUJD$", "is not base64"),
        ("A", "is not base64"),  # one character cannot be base64 of anything
        ("data:text/plain;base64,QUJD", "data URI must be"),
        (base64.b64encode(b"just some text, not an image").decode(), "could not be decoded"),
        (b64("truncated.jpg"), "could not be decoded"),
        (b64("too_thin.png"), "side under 64 px"),
    ],
)
def test_a_bad_image_is_a_422_that_says_which(value: str, says: str) -> None:
    assert says in refused(value)


def test_too_many_bytes_is_refused_before_decoding() -> None:
    limits = LimitSettings(image_max_bytes=1024)
    assert "more than the limit of 1024 bytes" in refused(base64.b64encode(bytes(2000)).decode(), limits)


def test_too_many_pixels_is_refused_before_the_pixels_are_decoded() -> None:
    # A 12000x12000 PNG of one colour is a few KB; decoded it would be 432 MB.
    buffer = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buffer, "PNG")
    assert len(buffer.getvalue()) < 1_000_000
    message = refused(base64.b64encode(buffer.getvalue()).decode())
    assert "12000x12000 is 144.0 MP, more than the limit of 40 MP" in message


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares a size and has no pixel data: Pillow reads the size from it, decodes nothing."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_a_size_pillow_itself_calls_a_bomb_is_refused_in_our_words() -> None:
    # Past twice its own limit (179 MP) Pillow raises in open(), before our check reads the size.
    message = refused(base64.b64encode(png_header(20_000, 20_000)).decode())
    assert message == "image: more than the limit of 40 MP"


def test_an_image_too_thin_only_once_scaled_down_says_both_sizes() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (100, 5000)).save(buffer, "PNG")
    message = refused(base64.b64encode(buffer.getvalue()).decode())
    assert message == (
        "image: 100x5000 is 41x2048 once its longer side is scaled to 2048 px, a side under 64 px"
    )


def test_a_side_under_64_px_is_refused_before_its_pixels_are_decoded() -> None:
    assert refused(base64.b64encode(png_header(1, 5000)).decode()) == "image: 1x5000 has a side under 64 px"


def test_urls_are_refused_while_fetching_is_off() -> None:
    for url in ("https://example.com/cat.png", "HTTP://example.com/cat.png", " http://10.0.0.1/x"):
        assert refused(url) == URLS_OFF


@pytest.mark.parametrize("name", ["landscape.png", "landscape.jpg", "landscape.webp", "two_frames.gif",
                                  "landscape.bmp", "landscape.tiff", "rotated_exif.jpg"])  # fmt: skip
def test_corrupted_files_decode_or_are_a_422_never_anything_else(name: str) -> None:
    """Random byte flips and truncations of real files: a decoder's crash must not become a 500."""
    rng = np.random.default_rng(len(name))
    original = (IMAGES / name).read_bytes()
    for _ in range(60):
        data = bytearray(original)
        for position in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
            data[position] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            data = data[: int(rng.integers(1, len(data)))]
        try:
            image = decode_pixels(bytes(data), LIMITS)
        except InvalidRequest as exc:
            assert exc.message.startswith("image: ")
        else:
            assert image.pixels.ndim == 3 and image.pixels.shape[2] == 3
