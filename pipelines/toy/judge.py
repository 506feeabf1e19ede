"""A small deterministic judge of the toy world: what an image shows, read from its pixels by rules.

It reads, in this order:

1. every pixel's nearest named colour (Euclidean RGB distance to `world.COLOURS`);
2. the background: the most common of those colours (the shape covers under a tenth of the image);
3. the shape: the largest connected region of pixels not of the background colour;
4. its colour: the most common named colour in the region's *core* — the pixels at least half the
   region's largest inner distance from its edge — so that the blurred rim, where a red shape on a
   yellow background turns orange, does not vote;
5. its coverage per pixel (alpha), from where the pixel's colour lies between the background and the
   shape colour, around the region;
6. its kind: a triangle (upright) if its vertical alpha profile is skewed towards the base, else a
   circle or a square by how much of its bounding box (alpha ≥ ½) the summed alpha fills (π/4 or 1);
7. its position: the cell of a 3x3 grid that holds its alpha-weighted centroid.

No step depends on the image size, and none on a learned weight. Blur and JPEG noise move pixels
only near edges and only a little in colour, which steps 2, 4 and 5 are built to ignore.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipelines.toy.world import COLOURS, POSITIONS, Caption

_NAMES = tuple(COLOURS)
_TABLE = np.array([COLOURS[n] for n in _NAMES], dtype=np.float32)
# The triangle's vertical skew is −0.57, a circle's and a square's 0; a circle fills π/4 ≈ 0.79 of its
# bounding box and a square all of it: thresholds half-way between.
_TRIANGLE_SKEW_BELOW = -0.28
_CIRCLE_BELOW = 0.89
# A region smaller than this share of the image is noise, not a shape (the smallest drawn shape
# covers 2·0.12² ≈ 2.9 % of a square image).
_MIN_AREA = 0.002
_GRID = {(col, row): name for name, (x, y) in POSITIONS.items() for col, row in [(int(3 * x), int(3 * y))]}


@dataclass(frozen=True)
class Reading:
    background: str
    colour: str | None  # None: no shape found
    shape: str | None
    position: str | None

    def agrees_with(self, caption: Caption) -> dict[str, bool]:
        """Per attribute, whether the image shows what the caption says (position only if it says one)."""
        out = {
            "background": self.background == caption.background,
            "colour": self.colour == caption.colour,
            "shape": self.shape == caption.shape,
        }
        if caption.position is not None:
            out["position"] = self.position == caption.position
        return out


def nearest_colours(image: np.ndarray) -> np.ndarray:
    """[H, W] index into `COLOURS` of every pixel's nearest named colour."""
    pixels = image.astype(np.float32)
    distances = ((pixels[..., None, :] - _TABLE) ** 2).sum(axis=-1)
    return distances.argmin(axis=-1)


def read(image: np.ndarray) -> Reading:
    """What an [H, W, 3] uint8 RGB image of the toy world shows."""
    labels = nearest_colours(image)
    height, width = labels.shape
    counts = np.bincount(labels.ravel(), minlength=len(_NAMES))
    background = int(counts.argmax())

    regions, n = ndimage.label(labels != background)
    if n == 0:
        return Reading(_NAMES[background], None, None, None)
    sizes = np.bincount(regions.ravel())[1:]
    biggest = int(sizes.argmax()) + 1
    mask = regions == biggest
    area = int(mask.sum())
    if area < _MIN_AREA * height * width:
        return Reading(_NAMES[background], None, None, None)

    inner = ndimage.distance_transform_edt(mask)
    core = inner >= 0.5 * inner.max()
    colour = int(np.bincount(labels[core], minlength=len(_NAMES)).argmax())

    # How much of each pixel is shape: its colour projected on the segment background → shape colour.
    # A blur moves coverage around but keeps its sum, so the area and centroid read from `alpha`
    # survive the VAE's softening of the rim, which a hard mask's area would not.
    near = ndimage.binary_dilation(mask, iterations=max(1, round(0.02 * min(height, width))))
    bg, fg = _TABLE[background], _TABLE[colour]
    alpha = ((image.astype(np.float32) - bg) @ (fg - bg)) / float((fg - bg) @ (fg - bg))
    alpha = np.where(near, np.clip(alpha, 0.0, 1.0), 0.0)
    total = float(alpha.sum())
    if total <= 0.0:
        return Reading(_NAMES[background], _NAMES[colour], None, None)
    ys, xs = np.indices(alpha.shape)
    cy_px = float((alpha * ys).sum()) / total
    # Upright triangle: its mass thins towards the apex, so the vertical profile is skewed (−0.57 for
    # a sharp render); circle and square are symmetric (0). A blur adds a symmetric spread, which
    # shrinks the skew but keeps its sign, so the threshold sits at half the sharp value.
    dy = ys - cy_px
    variance = float((alpha * dy**2).sum()) / total
    skew = float((alpha * dy**3).sum()) / total / max(variance, 1e-9) ** 1.5
    solid = alpha >= 0.5
    if skew < _TRIANGLE_SKEW_BELOW:
        shape = "triangle"
    elif solid.any():
        rows, cols = np.nonzero(solid)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        shape = "circle" if total / box < _CIRCLE_BELOW else "square"
    else:
        return Reading(_NAMES[background], _NAMES[colour], None, None)

    cx = (float((alpha * xs).sum()) / total + 0.5) / width
    cy = (cy_px + 0.5) / height
    position = _GRID[(min(int(3 * cx), 2), min(int(3 * cy), 2))]
    return Reading(_NAMES[background], _NAMES[colour], shape, position)
