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
6. its position: the cell of a 3x3 grid that holds the alpha-weighted centroid;
7. its kind: the world's own circle, square and upright triangle, each drawn at the area and
   centroid of the shape colour's coverage over the whole image and nudged in place and size to fit
   best, are compared with that coverage; the kind is the one that overlaps it most
   (intersection over union), or none — "no clean shape" — when even that one overlaps less than
   `CLEAN_FIT`: fragments scattered over a patch of the image, or a blob that is no kind at all.

No step depends on the image size, and none on a learned weight. Blur and JPEG noise move pixels
only near edges and only a little in colour, which steps 2, 4 and 5 are built to ignore; the fit of
step 7 reads a shape as a whole, so a speck or sliver beside an edge, a dark rim or a ragged side
lowers it a little without changing which kind fits best (tests/pipelines/test_toy_judge.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from pipelines.toy.world import COLOURS, POSITIONS, SHAPES, Caption, Scene, coverage, signed_distance

_NAMES = tuple(COLOURS)
_TABLE = np.array([COLOURS[n] for n in _NAMES], dtype=np.float32)
# Below this overlap with the best-fitting kind there is no clean shape. Clean renders fit their own
# kind at ≥ 0.98, blurred or JPEG-compressed ones at ≥ 0.73 and shapes whose outline wanders by 2 % of
# the side (ragged, flame-like sides) at ≥ 0.62, while fragments scattered over a patch fit nothing
# above 0.39 (tests/pipelines/test_toy_judge.py); the line sits just under the ragged shapes, so that
# a blob more ragged than they are is no shape (docs/toy.md §27).
CLEAN_FIT = 0.6
# A region smaller than this share of the image is noise, not a shape (the smallest drawn shape
# covers 2·0.12² ≈ 2.9 % of a square image).
_MIN_AREA = 0.002
_GRID = {(col, row): name for name, (x, y) in POSITIONS.items() for col, row in [(int(3 * x), int(3 * y))]}
# Each kind's area, and how far its centroid lies below the centre of its box, for a half-size s = 1:
# the world draws the triangle with its apex at the top of a 2s × 2s box and its base at the bottom.
_AREA = {"circle": np.pi, "square": 4.0, "triangle": 2.0}
_CENTROID_BELOW = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 3.0}


@dataclass(frozen=True)
class Reading:
    background: str
    colour: str | None  # None: no shape found
    shape: str | None  # None: no shape found, or no clean shape (nothing fits `CLEAN_FIT`)
    position: str | None
    # The best kind's overlap with the shape colour's coverage (None: no shape found). Left out of
    # equality, so that a reading compares by what it says, not by how surely.
    fit: float | None = field(default=None, compare=False)

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
    # A blur moves coverage around but keeps its sum, so the area and centroid read from it survive
    # the VAE's softening of the rim, which a hard mask's area would not.
    reach = max(1, round(0.02 * min(height, width)))
    covered = _coverage(image, _TABLE[background], _TABLE[colour])
    alpha = np.where(ndimage.binary_dilation(mask, iterations=reach), covered, 0.0)
    if alpha.sum() <= 0.0:
        return Reading(_NAMES[background], _NAMES[colour], None, None)
    cx, cy = _centroid(alpha)
    position = _GRID[(min(int(3 * cx / width), 2), min(int(3 * cy / height), 2))]

    # The kind is read from all of the colour's coverage, not the largest region's alone, so that a
    # shape broken into fragments is seen as the scatter it is.
    everywhere = np.where(ndimage.binary_dilation(labels == colour, iterations=reach), covered, 0.0)
    centre = _centroid(everywhere)
    fits = {kind: _fit(everywhere, kind, centre) for kind in SHAPES}
    best = max(fits, key=fits.__getitem__)
    shape = best if fits[best] >= CLEAN_FIT else None
    return Reading(_NAMES[background], _NAMES[colour], shape, position, fit=round(fits[best], 4))


def _coverage(image: np.ndarray, background: np.ndarray, colour: np.ndarray) -> np.ndarray:
    along = colour - background
    projected = ((image.astype(np.float32) - background) @ along) / float(along @ along)
    return np.clip(projected, 0.0, 1.0)


def _centroid(alpha: np.ndarray) -> tuple[float, float]:
    """The alpha-weighted centre (x, y) in pixels, pixel centres at half-integers."""
    total = float(alpha.sum())
    rows, cols = alpha.sum(axis=1), alpha.sum(axis=0)
    x = float(cols @ (np.arange(alpha.shape[1]) + 0.5)) / total
    y = float(rows @ (np.arange(alpha.shape[0]) + 0.5)) / total
    return x, y


def _fit(alpha: np.ndarray, kind: str, centre: tuple[float, float]) -> float:
    """The largest overlap (intersection over union of coverages) of `kind`, drawn as the world draws
    it, with `alpha`: started at `alpha`'s area and centroid (`centre`), then nudged in x, y and size
    by halving steps while the overlap grows (a shape with a sliver beside it, or a dark rim, has its
    centroid or area a little off its body's), within half a half-size of the start and a factor
    0.6–1.5 in size."""
    start = np.array([*centre, float(np.sqrt(float(alpha.sum()) / _AREA[kind]))])
    half = float(start[2])
    low = start - [0.5 * half, 0.5 * half, 0.4 * half]
    high = start + [0.5 * half, 0.5 * half, 0.5 * half]
    # Only a window around the coverage is compared, with room for the largest shape the bounds allow.
    rows = np.nonzero(alpha.any(axis=1))[0]
    cols = np.nonzero(alpha.any(axis=0))[0]
    margin = int(np.ceil(2.5 * half)) + 2
    top, left = max(0, rows[0] - margin), max(0, cols[0] - margin)
    window = alpha[top : rows[-1] + 1 + margin, left : cols[-1] + 1 + margin]
    window_h, window_w = window.shape

    def overlap(p: np.ndarray) -> float:
        x, y, s = p[0] - left, p[1] - top, p[2]
        # The world's shape, in fractions of the window; the triangle's box centre lies above its centroid.
        scene = Scene(
            Caption(kind, "red", "blue"),
            x / window_w,
            (y - _CENTROID_BELOW[kind] * s) / window_h,
            s / min(window_h, window_w),
        )
        drawn = coverage(signed_distance(scene, window_w, window_h))
        return float(np.minimum(window, drawn).sum() / np.maximum(window, drawn).sum())

    point, best = start, overlap(start)
    for step in (0.2, 0.1, 0.05, 0.025):
        moved = True
        while moved:
            moved = False
            for axis in range(3):
                for sign in (-1.0, 1.0):
                    trial = point.copy()
                    trial[axis] = np.clip(trial[axis] + sign * step * half, low[axis], high[axis])
                    value = overlap(trial) if trial[axis] != point[axis] else best
                    if value > best:
                        best, point, moved = value, trial, True
    return best
