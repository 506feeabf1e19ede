"""Writes the small input images the img2img tests decode. Run from the repository root:

    python tests/data/images/make_images.py

Each file pins one decoding rule of server/image_input.py; they are committed, so the tests never
depend on this script's Pillow version.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).parent


def pattern(width: int, height: int) -> np.ndarray:
    """Red grows to the right, green downwards: a transposed or flipped decode shows."""
    ys, xs = np.mgrid[0:height, 0:width]
    red = xs * 255 // (width - 1)
    green = ys * 255 // (height - 1)
    return np.stack([red, green, np.full_like(xs, 60)], -1).astype(np.uint8)


def main() -> None:
    base = Image.fromarray(pattern(96, 72))
    base.save(HERE / "landscape.png")
    base.save(HERE / "landscape.webp", lossless=True)
    base.save(HERE / "landscape.bmp")
    base.save(HERE / "landscape.tiff")
    base.save(HERE / "landscape.jpg", quality=95)

    # Stored as 72x96 (rotated back) with EXIF orientation 6 ("rotate 90° clockwise to view"): decoded
    # with the transpose, it is the 96x72 landscape again.
    exif = Image.Exif()
    exif[0x0112] = 6
    base.transpose(Image.Transpose.ROTATE_90).save(HERE / "rotated_exif.jpg", quality=95, exif=exif)

    # Alpha dropped, not composited: a fully transparent pixel keeps its colour.
    rgba = np.dstack([pattern(80, 64), np.zeros((64, 80), np.uint8)])
    Image.fromarray(rgba, "RGBA").save(HERE / "transparent.png")

    # Two frames: only the first (red) is decoded.
    red = Image.new("RGB", (64, 64), (255, 0, 0))
    blue = Image.new("RGB", (64, 64), (0, 0, 255))
    red.save(HERE / "two_frames.gif", save_all=True, append_images=[blue], duration=100)

    # 16-bit grayscale: the 1/255 scaling of integer pixels saturates anything above 255·255.
    gray = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(gray).save(HERE / "gray16.png")

    Image.new("RGB", (100, 40), (10, 20, 30)).save(HERE / "too_thin.png")

    jpeg = io.BytesIO()
    base.save(jpeg, "JPEG", quality=95)
    (HERE / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 3])


if __name__ == "__main__":
    main()
