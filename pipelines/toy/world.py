"""The toy world: one flat-coloured shape on a flat background of another colour, and its captions.

Everything is a pure function of its inputs: a `Scene` (what and where, in fractions of the image)
renders the same pixels on every machine, and `scene_for(caption, rng)` draws a layout from a numpy
`Generator`, so a seed fixes the data set. The world is scale-free: shapes are described in
fractions of the image and rendered from their signed distance (one pixel of analytic
anti-aliasing), so a scene looks the same at 64 px and at 1024 px.

Captions form a finite set (`all_captions()`): shape × colour × background colour (different from the
shape's) × (no position word, or one of nine), e.g. "a red circle on a blue background at the top left".
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

# Named colours, far apart in RGB so that each stays itself through a VAE and a judge reading
# nearest-colour; orange sits between red and yellow, so those three are kept the farthest apart
# that flat sRGB allows.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (35, 70, 225),
    "yellow": (245, 225, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "orange": (245, 135, 20),
    "purple": (140, 45, 175),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# A 3x3 grid: position name → (x, y) of the cell's centre, in fractions of the width and height.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (1 / 6, 1 / 6),
    "top": (1 / 2, 1 / 6),
    "top right": (5 / 6, 1 / 6),
    "left": (1 / 6, 1 / 2),
    "center": (1 / 2, 1 / 2),
    "right": (5 / 6, 1 / 2),
    "bottom left": (1 / 6, 5 / 6),
    "bottom": (1 / 2, 5 / 6),
    "bottom right": (5 / 6, 5 / 6),
}
_PHRASES: dict[str, str] = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}

# Layout: the shape's half-size is a fraction of the shorter side, and a positioned shape's centre
# stays within JITTER of its cell's centre: so its centre never leaves its cell, and the shape never
# touches the image's edge (1/6 − JITTER − MAX_HALF_SIZE ≈ 0.017 of the side, even on the longer side).
MIN_HALF_SIZE = 0.12
MAX_HALF_SIZE = 0.145
JITTER = 0.005
# An unpositioned shape may sit anywhere that keeps this margin from the edges ("anywhere"), or, in
# the "cells" variant of the world, in one of the nine cells as a positioned shape does: a model must
# then choose one of nine places, not one of a continuum (a guess that did not pay: docs/toy.md §16).
_MARGIN = 0.02
UNPOSITIONED = ("anywhere", "cells")


@dataclass(frozen=True)
class Caption:
    shape: str
    colour: str
    background: str
    position: str | None = None  # a key of POSITIONS, or None: anywhere

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.colour not in COLOURS or self.background not in COLOURS:
            raise ValueError(f"unknown colour in {self!r}")
        if self.colour == self.background:
            raise ValueError("the shape and the background must differ in colour")
        if self.position is not None and self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}")

    @property
    def text(self) -> str:
        words = f"{_article(self.colour)} {self.shape} on {_article(self.background)} background"
        return words if self.position is None else f"{words} {_PHRASES[self.position]}"


def partial_texts(caption: Caption) -> tuple[str, ...]:
    """Shorter prompts that are still true of `caption`'s image, in a fixed order: the shape's colour
    alone ("red"), its colour and kind ("a red circle"), its kind ("a circle") and the background
    ("a blue background"). Training on them as well gives a bare word the meaning a user's negative
    prompt or partial prompt expects: a model trained only on whole sentences reads "red" as whatever
    its random text encoders happen to put there."""
    return (
        caption.colour,
        f"{_article(caption.colour)} {caption.shape}",
        _article(caption.shape),
        f"{_article(caption.background)} background",
    )


def _article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


@cache
def all_captions() -> tuple[Caption, ...]:
    """The finite caption set, in a fixed order (the index of a caption is stable across runs)."""
    return tuple(
        Caption(shape, colour, background, position)
        for position in (None, *POSITIONS)
        for shape in SHAPES
        for colour in COLOURS
        for background in COLOURS
        if background != colour
    )


def vocabulary() -> tuple[str, ...]:
    """Every word of the captions and their partial prompts, sorted: the toy tokenizers' whole words."""
    return tuple(
        sorted({w for c in all_captions() for text in (c.text, *partial_texts(c)) for w in text.split()})
    )


def parse_caption(text: str) -> Caption:
    """The `Caption` whose `text` is exactly `text` (ValueError if it is not one of the set)."""
    found = _by_text().get(text)
    if found is None:
        raise ValueError(f"{text!r} is not a caption of the toy world")
    return found


@cache
def _by_text() -> dict[str, Caption]:
    return {c.text: c for c in all_captions()}


@dataclass(frozen=True)
class Scene:
    caption: Caption
    x: float  # the shape's centre, in fractions of the width ...
    y: float  # ... and of the height (0 = top)
    half_size: float  # in fractions of the shorter side


def scene_for(
    caption: Caption,
    rng: np.random.Generator,
    *,
    unpositioned: str = "anywhere",
    unpositioned_scale: float = 1.0,
) -> Scene:
    """A layout for `caption`, drawn from `rng` (the same draws in the same order on every machine);
    `unpositioned` says where a caption without a position word may put its shape (`UNPOSITIONED`), and
    `unpositioned_scale` how much larger than a positioned one it is drawn."""
    if unpositioned not in UNPOSITIONED:
        raise ValueError(f"unpositioned must be one of {UNPOSITIONED}, not {unpositioned!r}")
    check_unpositioned_scale(unpositioned_scale, unpositioned)
    half = float(rng.uniform(MIN_HALF_SIZE, MAX_HALF_SIZE))
    if caption.position is None:
        half *= unpositioned_scale
    if caption.position is None and unpositioned == "anywhere":
        low, high = half + _MARGIN, 1.0 - half - _MARGIN
        x, y = float(rng.uniform(low, high)), float(rng.uniform(low, high))
    else:
        cell = caption.position or list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
        cx, cy = POSITIONS[cell]
        x = cx + float(rng.uniform(-JITTER, JITTER))
        y = cy + float(rng.uniform(-JITTER, JITTER))
    return Scene(caption, x, y, half)


def check_unpositioned_scale(scale: float, unpositioned: str = "anywhere") -> None:
    """Raise unless an unpositioned shape `scale` times the largest half-size still keeps the margin
    from every edge; the "cells" world, whose shapes sit in a cell, takes no scale."""
    if unpositioned == "cells" and scale != 1.0:
        raise ValueError("unpositioned_scale applies to the 'anywhere' world only")
    limit = (0.5 - _MARGIN) / MAX_HALF_SIZE
    if not 0.5 <= scale <= limit:
        raise ValueError(f"unpositioned_scale must lie in [0.5, {limit:.2f}], not {scale}")


def random_scene(
    rng: np.random.Generator,
    *,
    unpositioned: str = "anywhere",
    unpositioned_share: float | None = None,
    unpositioned_scale: float = 1.0,
) -> Scene:
    """A caption drawn uniformly from `all_captions()` (a tenth of which name no position), or, with
    `unpositioned_share`, from those naming no position with that probability and from the others
    otherwise; then its layout."""
    captions = all_captions()
    if unpositioned_share is not None:
        if not 0.0 <= unpositioned_share <= 1.0:
            raise ValueError(f"unpositioned_share must lie in [0, 1], not {unpositioned_share}")
        without = rng.random() < unpositioned_share
        captions = tuple(c for c in captions if (c.position is None) == without)
    caption = captions[int(rng.integers(len(captions)))]
    return scene_for(caption, rng, unpositioned=unpositioned, unpositioned_scale=unpositioned_scale)


def signed_distance(scene: Scene, width: int, height: int) -> np.ndarray:
    """The shape's signed distance in pixels at each pixel centre [H, W]: negative inside."""
    unit = min(width, height)
    px = (np.arange(width, dtype=np.float64) + 0.5)[None, :] - scene.x * width
    py = (np.arange(height, dtype=np.float64) + 0.5)[:, None] - scene.y * height
    s = scene.half_size * unit
    kind = scene.caption.shape
    if kind == "circle":
        return np.hypot(px, py) - s
    if kind == "square":
        return np.maximum(np.abs(px), np.abs(py)) - s
    # An upright isosceles triangle: apex at the top centre of its 2s × 2s box, base along the bottom.
    # Inside is the intersection of three half-planes; the largest of the three distances is exact
    # along the edges, which is all the anti-aliasing needs.
    norm = np.hypot(2.0, 1.0)
    right = (2.0 * px - py - s) / norm  # the edge from the apex (0, −s) to (s, s)
    left = (-2.0 * px - py - s) / norm  # the edge from the apex to (−s, s)
    base = py - s
    return np.maximum(np.maximum(right, left), base)


def coverage(distance: np.ndarray) -> np.ndarray:
    """How much of each pixel a shape covers, from its signed distance: one pixel of anti-aliasing."""
    return np.clip(0.5 - distance, 0.0, 1.0)


def paint(scene: Scene, covered: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 RGB: the scene's shape colour over its background, blended by `covered` [H, W]."""
    background = np.array(COLOURS[scene.caption.background], dtype=np.float64)
    colour = np.array(COLOURS[scene.caption.colour], dtype=np.float64)
    pixels = background + np.clip(covered, 0.0, 1.0)[..., None] * (colour - background)
    return np.rint(pixels).astype(np.uint8)


def render(scene: Scene, width: int, height: int | None = None) -> np.ndarray:
    """The scene as an [H, W, 3] uint8 RGB image."""
    height = width if height is None else height
    return paint(scene, coverage(signed_distance(scene, width, height)))
