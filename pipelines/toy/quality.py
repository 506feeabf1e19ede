"""Quality of generated images in numbers: prompt adherence read by the judge, colour shares, and
how far one image is from another (PSNR, SSIM).

Shared by `benchmarks/quality.py` (the report over hundreds of prompt×seed pairs) and the tests that
pin what the trained toy must do (tests/pipelines/test_toy_quality.py). Every function takes
finished images or a generator and requests, never the model's internals: what is measured is what
a client receives.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.request import GenerationRequest, GenerationResult
from pipelines.toy import judge, world

ATTRIBUTES = ("background", "colour", "shape", "position")


class Generates(Protocol):
    def generate(self, request: GenerationRequest) -> GenerationResult: ...


@dataclass(frozen=True)
class Adherence:
    """Share of images whose attribute the judge reads as captioned (position: among captions naming one)."""

    background: float
    colour: float
    shape: float
    position: float
    count: int
    # (asked kind, kind read or None) → images: which kinds the shape score's misses are.
    kinds: Mapping[tuple[str, str | None], int] = field(default_factory=dict)
    # The same shares among captions with a position word and among those without: a caption without
    # one lets the shape sit anywhere, a different task for the model (docs/toy.md §11).
    by_position: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        return {name: round(getattr(self, name), 3) for name in ATTRIBUTES} | {"count": self.count}


def prompt_seed_pairs(
    count: int, *, seed: int = 0, positioned: float = 0.5
) -> list[tuple[world.Caption, int]]:
    """`count` (caption, seed) pairs: distinct captions drawn from the whole set, about `positioned` of
    them naming a position, each with its own image seed."""
    captions = world.all_captions()
    with_position = [c for c in captions if c.position is not None]
    without = [c for c in captions if c.position is None]
    rng = np.random.default_rng([seed, 7])
    n_pos = round(count * positioned)
    chosen = [with_position[i] for i in rng.choice(len(with_position), size=n_pos, replace=False)]
    chosen += [
        without[i] for i in rng.choice(len(without), size=count - n_pos, replace=count - n_pos > len(without))
    ]
    order = rng.permutation(len(chosen))
    return [(chosen[i], 1000 * seed + k) for k, i in enumerate(order)]


def adherence(
    generator: Generates, pairs: Iterable[tuple[world.Caption, int]], base: GenerationRequest
) -> Adherence:
    """Generate each (caption, seed) with `base`'s other settings and read it with the judge."""
    pairs = list(pairs)
    return adherence_of(pairs, generate(generator, pairs, base))


def generate(
    generator: Generates, pairs: Iterable[tuple[world.Caption, int]], base: GenerationRequest
) -> list[np.ndarray]:
    """The image of each (caption, seed), with `base`'s other settings."""
    return [generator.generate(replace(base, prompt=c.text, seed=seed)).images[0] for c, seed in pairs]


def adherence_of(pairs: Sequence[tuple[world.Caption, int]], images: Sequence[np.ndarray]) -> Adherence:
    """Read each image with the judge against its pair's caption."""
    hits: dict[str, list[bool]] = {name: [] for name in ATTRIBUTES}
    split: dict[str, dict[str, list[bool]]] = {}
    kinds: Counter[tuple[str, str | None]] = Counter()
    for (caption, _), image in zip(pairs, images, strict=True):
        reading = judge.read(image)
        group = split.setdefault("without" if caption.position is None else "with", {})
        for name, ok in reading.agrees_with(caption).items():
            hits[name].append(ok)
            group.setdefault(name, []).append(ok)
        kinds[caption.shape, reading.shape] += 1
    by_position = {
        group: _shares(found) | {"count": len(found["background"])} for group, found in sorted(split.items())
    }
    return Adherence(count=len(images), kinds=dict(kinds), by_position=by_position, **_shares(hits))


def _shares(hits: Mapping[str, list[bool]]) -> dict[str, float]:
    return {name: (sum(v) / len(v) if v else math.nan) for name, v in hits.items()}


def colour_share(image: np.ndarray, colour: str) -> float:
    """Share of the pixels whose nearest named colour is `colour`."""
    index = tuple(world.COLOURS).index(colour)
    return float((judge.nearest_colours(image) == index).mean())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images, in dB (inf when equal)."""
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def psnr_gain(image: np.ndarray, other: np.ndarray, reference: np.ndarray) -> float:
    """How much nearer `image` is to `reference` than `other` is, in dB of PSNR (0 when both equal it)."""
    ours, theirs = psnr(image, reference), psnr(other, reference)
    return 0.0 if ours == theirs else ours - theirs  # inf − inf would be NaN


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity (Wang et al. 2004: 11-px Gaussian window, σ 1.5, K1 0.01, K2 0.03) of
    two uint8 RGB images, averaged over channels and positions."""
    x, y = (torch.from_numpy(im.astype(np.float64)).permute(2, 0, 1)[:, None] for im in (a, b))
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    index = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(index.mean())


def mean_psnr(images: Sequence[np.ndarray], references: Sequence[np.ndarray]) -> float:
    """PSNR of the pooled error over several image pairs (one mean squared error, then dB)."""
    pairs = zip(images, references, strict=True)
    mse = float(np.mean([((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean() for a, b in pairs]))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def weighted_text(caption: world.Caption, weight: float) -> str:
    """The caption with its shape's colour word written `(colour:weight)`."""
    return caption.text.replace(caption.colour, f"({caption.colour}:{weight})", 1)


def colour_word_probes() -> list[tuple[world.Caption, str]]:
    """Ten "a C1 circle on a C2 background" captions over the pairs of the first five colours, each
    with a third colour to change one of them to: the captions on which where a colour word's
    encoding lives is measured (`benchmarks/quality.py --only weights` and the tests use the same)."""
    colours = list(world.COLOURS)
    return [
        (world.Caption("circle", first, second, None), next(c for c in colours if c not in (first, second)))
        for first, second in itertools.combinations(colours[:5], 2)
    ]


def own_position_share(
    context: Callable[[str], torch.Tensor], caption: world.Caption, other: str, t5_start: int
) -> float:
    """How much of the T5 part's squared difference between `caption` and the same caption with the
    shape's colour `other` lies at the colour word's own positions. Those are the positions a
    `(colour:w)` weight moves (found as the ones that weighting the word by 0 changes), so this is
    the most of the word a weight can reach. `context(text)` is the conditioning's context [L, D]."""
    plain = context(caption.text)
    word = (context(weighted_text(caption, 0.0)) - plain)[t5_start:].norm(dim=-1) > 0
    apart = ((plain - context(replace(caption, colour=other).text))[t5_start:] ** 2).sum(-1)
    return float(apart[word].sum() / apart.sum())


def open_colour_prompts(count: int, *, seed: int = 0) -> list[tuple[str, int]]:
    """`count` (prompt, seed) pairs whose prompt names the shape's kind alone ("a circle", one of
    `world.partial_texts`, which the toy was trained on): the prompt leaves the colours to the seed."""
    return [(f"a {world.SHAPES[k % len(world.SHAPES)]}", 1000 * seed + k) for k in range(count)]


@dataclass(frozen=True)
class Steering:
    """What a negative prompt naming the colour an image would be drawn in does to that image."""

    read: int  # images in which the judge found a shape without the negative (the others are skipped)
    kept: int  # ... whose shape is still read in that colour with it
    before: tuple[float, ...]  # the colour's share of the pixels without the negative, per image
    after: tuple[float, ...]  # ... and with it

    def paired(self) -> tuple[float, float, int]:
        """Mean change of the share, its standard error, and the images in which it fell."""
        return paired_difference(self.after, self.before)


def generate_in_turn(
    variants: Mapping[str, tuple[Generates, GenerationRequest]],
    pairs: Sequence[tuple[world.Caption, int]],
) -> dict[str, list[GenerationResult]]:
    """Each variant's result for each (caption, seed), made so that their timings compare: every variant
    first runs the first pair once and drops it (a first call pays for its set-up), then the variants
    take turns pair by pair, each round starting one variant further along, so that neither the
    machine's drift within a round nor following a given variant favours one of them."""
    labels = list(variants)
    results: dict[str, list[GenerationResult]] = {label: [] for label in labels}
    if not pairs:
        return results
    first, first_seed = pairs[0]
    for runner, base in variants.values():
        runner.generate(replace(base, prompt=first.text, seed=first_seed))
    for index, (caption, seed) in enumerate(pairs):
        start = index % len(labels)
        for label in labels[start:] + labels[:start]:
            runner, base = variants[label]
            results[label].append(runner.generate(replace(base, prompt=caption.text, seed=seed)))
    return results


def paired_difference(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray | None = None
) -> tuple[float, float, int]:
    """a − b pair by pair (a alone where it already holds the differences, e.g. `psnr_gain`s): its mean,
    the mean's standard error (NaN for fewer than two pairs), and in how many pairs it is negative."""
    diff = np.subtract(a, b) if b is not None else np.asarray(a, dtype=np.float64)
    error = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else math.nan
    return float(diff.mean()), error, int((diff < 0).sum())


def negative_steering(
    generator: Generates, prompts: Iterable[tuple[str, int]], base: GenerationRequest
) -> Steering:
    """For each (prompt, seed): the image with `base`'s settings, the shape colour the judge reads in
    it, and the same request with that colour as its negative prompt. A prompt that names the colour
    itself pulls against its negative, so the prompts here should leave it open
    (`open_colour_prompts`): then the negative decides between colours the model may draw, which is
    what a user's negative prompt is for."""
    read = kept = 0
    before, after = [], []
    for prompt, seed in prompts:
        request = replace(base, prompt=prompt, seed=seed)
        image = generator.generate(request).images[0]
        colour = judge.read(image).colour
        if colour is None:
            continue
        steered = generator.generate(replace(request, negative_prompt=colour)).images[0]
        read += 1
        kept += judge.read(steered).colour == colour
        before.append(colour_share(image, colour))
        after.append(colour_share(steered, colour))
    return Steering(read=read, kept=kept, before=tuple(before), after=tuple(after))
