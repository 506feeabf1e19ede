"""Image quality of the trained toy SD3 in numbers: prompt adherence, what each control does, how
every sampler converges, and how far batching, bf16 and the memory modes move an image.

    python benchmarks/quality.py                       # everything, ~1 h on 2 CPU cores
    python benchmarks/quality.py --only adherence --pairs 120 --size 512
    python benchmarks/quality.py --only convergence --size 128
    python benchmarks/quality.py --only adherence --pairs 100 --size 512 --no-cfg1 --save-images DIR
    python benchmarks/quality.py --only adherence --pairs 100 --size 512 --no-cfg1 --rejudge DIR
    python benchmarks/quality.py --only adherence --pairs 100 --no-cfg1 --rejudge DIR --judge-size 128

Sections (`--only`, repeatable):
- adherence: over `--pairs` prompt×seed pairs (distinct captions, half naming a position), the share
  of images whose background colour, shape colour, shape kind and position the judge
  (`pipelines/toy/judge.py`) reads as captioned, at the API's defaults (DPM++ 2M, 25 steps, CFG 5,
  shift 3) and at CFG 1 (no guidance) for comparison. `--save-images DIR` also writes every image it
  judged (PNG, with the pairs it answers and the model and settings it was sampled with); `--rejudge
  DIR` reads them back instead of generating, in seconds and without the model, so that a change to
  the judge is re-measured on the same pixels (the same --pairs, --seed, --size and --shift, or it
  refuses);
  with `--judge-size N` it reads them resized to N px, so a gap between two sizes can be told apart
  into the drawing's and the judge's. `--shift` samples at another shift than the API's 3.
- decided: at which σ the model commits to each attribute. The judge reads the transformer's one-step
  estimate of x0 from `--probe-pairs` real renders noised to σ (pipelines/toy/probe.py): right at a
  small σ whatever was learnt; near σ = 1 only the caption can say what to draw, so where a share
  falls is where sampling has to have decided it already (docs/toy.md §12).
- controls: a negative prompt naming the shape's colour, the negative-prompt window
  (`conditioningsettimesteprange_start/stop`, docs/sampling.md §5: the real negative acts only in
  the first ~10 % of the schedule; a zero-out negative covers [start, stop]; outside both,
  D = cfg·D_cond, which over-saturates), and the negative under plain CFG on every step (the SD3.5
  pages'): mean share of the named colour's pixels, and the image's distance from the default setting;
  then each negative's effect on the share paired prompt by prompt, with its standard error; and,
  with a prompt that names the shape's kind alone ("a circle"), how often a negative naming the
  colour that seed draws changes it, under the hosted window and under plain CFG.
- weights: what a `(colour:w)` weight does, first to the conditioning (how far it moves the context
  along the difference between two captions that differ in the colour word alone), then over
  `--pairs` prompts without a position word at w = 0, 0.5, 1, 1.5 (share of the colour's pixels, the
  judge's reading of the shape's colour, distance from w = 1, and the paired differences). At w = 0
  the word's own positions are the empty prompt's, so a model that reads the colour there loses it.
- words: how far apart the conditioning of two captions lies when they differ in one attribute's
  word alone (the shape's colour, the background, the shape's kind, the position), split by
  whether the two captions are as long as each other. The toy's tokenizers (the tiny model's) have
  one token per character, so a word of another length moves every later token; one of the same
  length changes only its own. Set beside the adherence figures, it says whether a kind the model
  does not draw is one its conditioning barely tells apart (docs/toy.md §16).
- convergence: every sampler at 4/8/16/32 steps, PSNR against the exact reference (DPM++ 2M at
  `--reference-steps`, fp32) and against the same sampler at the reference step count. Samplers that
  draw fresh noise every step (ancestral, SDE) converge in distribution, not image by image, so only
  their second column is expected to rise.
- settings: PSNR / SSIM of an image against the exact fp32 one when the server batches requests, in
  bf16, with the transformer in int8 (`--quantize int8`), and under each memory mode that runs on
  this device.
- approximations: bf16 (the CPU default where the CPU has native bf16), the int8 transformer
  (`--quantize int8`) and each level of the opt-in step cache (pipelines/step_cache.py), alone and on
  bf16, against the exact fp32 loop on the same `--pairs` prompt×seed pairs at the API's defaults:
  PSNR / SSIM to the exact image, adherence, the share of forwards whose later blocks were skipped,
  and the sampling speed-up (after one untimed run each, the variants take turns pair by pair, each
  round starting one further along, so the machine's noise and drift fall on all alike). A CPU
  without AVX512-BF16 or AMX only emulates bf16 (6x fp32's time on an AVX2-only EPYC), one without
  VNNI or AMX int8 (15.6x): there those variants are left out, with a line saying so, unless
  `--all-variants`.
- few-step: a LoRA for guidance 1 (`--lora`, a folder written by `python -m pipelines.toy.distill`,
  e.g. the committed pipelines/toy/few-step-4; docs/toy.md §15, §17, §35) run with `--few-sampler`
  (Euler unless told) at each of `--few-steps` (4 and 10, the txt2img page's fewest, unless told),
  against its teacher (the API's defaults) on `--pairs` pairs: PSNR / SSIM to the teacher's image
  from the same seed, adherence, transformer forwards an image and the sampling speed-up, beside the
  base model at the same step count with and without guidance, and at half the steps with guidance:
  the same forwards as the LoRA's, so that the LoRA is set against plain few-step CFG at equal work.
  `--also-lora DIR` (repeatable) adds more LoRAs at the same steps, each with its PSNR's paired
  difference from `--lora`'s: mean, standard error, and in how many pairs it is lower.
- guidance-fit: how near a LoRA's velocity at guidance 1 (`--lora`) is to the teacher's CFG
  velocity (what `python -m pipelines.toy.distill --method guidance` fits), σ by σ on 16 noised
  renders at `--size`, beside the base model's at guidance 1: where a LoRA falls short of CFG.

The model is `--model` (default `toy`, the committed weights) loaded through the serving code
(`server.runtime.load_runtime`), so what is measured is what a client would receive.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.request import GenerationRequest  # noqa: E402
from pipelines.toy import quality, world  # noqa: E402
from server.pricing import model_evaluations  # noqa: E402

if TYPE_CHECKING:
    from pipelines.sd3 import SD3Generator

SECTIONS = (
    "adherence",
    "decided",
    "controls",
    "weights",
    "words",
    "convergence",
    "settings",
    "approximations",
    "few-step",
    "guidance-fit",
)
LORA_SECTIONS = ("few-step", "guidance-fit")  # run by default only when --lora names one
DEFAULTS = GenerationRequest(prompt="")  # the API's defaults: DPM++ 2M, 25 steps, CFG 5, shift 3
CONVERGENCE_STEPS = (4, 8, 16, 32)
FEW_STEPS = [4, 10]  # 10: the txt2img page's fewest steps


def load(
    model: str,
    *,
    dtype: str = "fp32",
    memory: dict[str, str] | None = None,
    performance: dict[str, str] | None = None,
    lora: list[str] | None = None,
    **sampling: str,
) -> SD3Generator:
    from pipelines.sd3 import SD3Generator
    from server.config import Settings
    from server.runtime import load_runtime

    settings = Settings(
        data_dir=Path(tempfile.mkdtemp(prefix="sd3-quality-")),
        model={"id": model, "device": "cpu", "dtype": dtype, "lora": lora or []},
        memory=memory or {"mode": "device", "vae_tiling": "off", "attention_slicing": "off"},
        sampling=sampling,
        performance=performance or {},
    )
    generator = load_runtime(settings).generator
    # The measures read the pipeline's internals (the probe, the memory modes). `load_runtime` always
    # builds a local one; the check only narrows `Runtime.generator`'s protocol type, as in the others.
    assert isinstance(generator, SD3Generator)
    return generator


def table(header: list[str], rows: list[list[object]]) -> None:
    cells = [header, *[[_fmt(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for k, row in enumerate(cells):
        print(
            "  ".join(
                c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if k == 0:
            print("  ".join("-" * w for w in widths))
    print(flush=True)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "∞" if math.isinf(value) else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def adherence(generator: SD3Generator | None, args: argparse.Namespace) -> None:
    pairs = quality.prompt_seed_pairs(args.pairs, seed=args.seed)
    rows = []
    guided = replace(DEFAULTS, width=args.size, height=args.size, shift=args.shift)
    settings = [("API defaults (CFG 5)", guided)]
    if args.cfg1:
        settings.append(("CFG 1", replace(guided, guidance_scale=1.0)))
    kinds, split = {}, []
    for label, base in settings:
        started = time.perf_counter()
        folder = (args.rejudge or args.save_images or Path()) / _slug(label)
        if generator is None:
            images, made_by = _load_images(folder, pairs, _settings(base), size=args.judge_size)
        else:
            images = quality.generate(generator, pairs, base)
            if args.save_images is not None:
                _save_images(folder, pairs, images, _settings(base) | {"model": args.model})
        score = quality.adherence_of(pairs, images)
        kinds[label] = score.kinds
        for group, shares in score.by_position.items():
            split.append(
                [
                    label,
                    f"{group} a position word",
                    *[shares.get(a, math.nan) for a in quality.ATTRIBUTES],
                    shares["count"],
                ]
            )
        rows.append(
            [
                label,
                score.background,
                score.colour,
                score.shape,
                score.position,
                score.count,
                time.perf_counter() - started,
            ]
        )
    print(f"## Adherence at {args.size} px over {args.pairs} prompt×seed pairs")
    if generator is None:
        print(f"(images saved from model {made_by})")
    if args.shift != DEFAULTS.shift:
        print(f"(sampled at shift {args.shift:g}, not the API's {DEFAULTS.shift:g})")
    if args.judge_size is not None:
        print(f"(the saved images read at {args.judge_size} px)")
    table(["setting", "background", "shape colour", "shape", "position", "pairs", "seconds"], rows)
    print("\nby whether the caption names a position (without one, the shape may sit anywhere)")
    table(["setting", "captions", "background", "shape colour", "shape", "position", "pairs"], split)
    read_as = [*world.SHAPES, None]
    for label, counts in kinds.items():
        print(f"\nshape kind at {label}: captioned (rows) against read (columns; none: no clean shape)")
        table(
            ["captioned", *[kind or "none" for kind in read_as]],
            [[asked, *[counts.get((asked, kind), 0) for kind in read_as]] for asked in world.SHAPES],
        )


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def _settings(request: GenerationRequest) -> dict[str, object]:
    """What a saved image was sampled with, beside its prompt and seed: what its report's header names."""
    keys = ("width", "height", "shift", "scheduler", "steps", "guidance_scale")
    return {key: getattr(request, key) for key in keys}


def _save_images(
    folder: Path,
    pairs: Sequence[tuple[world.Caption, int]],
    images: Sequence[np.ndarray],
    settings: dict[str, object],
) -> None:
    """PNG (lossless, so a later judge reads the very pixels), the pairs they answer, in order, and the
    settings and model they were sampled with."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{k:04d}.png")
    index = [{"prompt": caption.text, "seed": seed} for caption, seed in pairs]
    (folder / "pairs.json").write_text(json.dumps(index, indent=1) + "\n")
    (folder / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")


def _load_images(
    folder: Path,
    pairs: Sequence[tuple[world.Caption, int]],
    settings: dict[str, object],
    *,
    size: int | None = None,
) -> tuple[list[np.ndarray], str]:
    """The saved images, in order, and the model they came from; with `size`, each box-filtered down
    (or up) to size × size, so that one set of pixels is judged at another resolution (is a gap
    between sizes the drawing's or the judge's?). Refused unless they answer `pairs` and were
    sampled with `settings`: the report's header names both."""
    from PIL import Image

    index_file, settings_file = folder / "pairs.json", folder / "settings.json"
    for needed in (index_file, settings_file):
        if not needed.is_file():
            sys.exit(f"--rejudge: {needed} is missing; write it with --save-images")
    saved = json.loads(index_file.read_text())
    expected = [{"prompt": caption.text, "seed": seed} for caption, seed in pairs]
    if saved != expected:
        # Reading images against other captions would report a figure of nothing.
        sys.exit(f"--rejudge: {folder} holds other pairs; pass the --pairs and --seed it was saved with")
    sampled = json.loads(settings_file.read_text())
    model = sampled.pop("model", "?")
    if sampled != settings:
        differ = ", ".join(
            f"{k} {sampled.get(k)} (not {v})" for k, v in settings.items() if sampled.get(k) != v
        )
        sys.exit(
            f"--rejudge: {folder} was sampled with {differ}; pass the --size and --shift it was saved with"
        )
    images = [Image.open(folder / f"{k:04d}.png").convert("RGB") for k in range(len(saved))]
    if size is not None:
        images = [image.resize((size, size), Image.Resampling.BOX) for image in images]
    return [np.asarray(image) for image in images], str(model)


def decided(generator: SD3Generator, args: argparse.Namespace) -> None:
    from pipelines.toy import folder_of, probe
    from pipelines.toy.train import trained_unpositioned_scale

    pairs = quality.prompt_seed_pairs(args.probe_pairs, seed=args.seed)
    scale = trained_unpositioned_scale(folder_of(args.model))  # renders of the world it was trained on
    scores = probe.readable_at(generator, pairs, size=args.size, unpositioned_scale=scale)
    print(f"## What the one-step estimate of x0 shows at {args.size} px, {args.probe_pairs} noised renders")
    rows: list[list[object]] = [
        [sigma, *[score.as_dict()[a] for a in quality.ATTRIBUTES]] for sigma, score in scores.items()
    ]
    table(["σ", *quality.ATTRIBUTES], rows)


def _colour_probe(args: argparse.Namespace) -> list[tuple[world.Caption, int]]:
    return quality.prompt_seed_pairs(max(8, args.pairs // 8), seed=args.seed + 1, positioned=0.0)


def controls(generator: SD3Generator, args: argparse.Namespace) -> None:
    pairs = _colour_probe(args)
    base = replace(DEFAULTS, width=args.size, height=args.size)
    shares: dict[str, list[float]] = {}

    def row(label: str, make: Callable[[world.Caption, int], GenerationRequest]) -> list[np.ndarray]:
        images = [generator.generate(make(caption, seed)).images[0] for caption, seed in pairs]
        shares[label] = [quality.colour_share(im, c.colour) for im, (c, _) in zip(images, pairs, strict=True)]
        return images

    captioned = "prompt as captioned"
    reference = row(captioned, lambda c, s: replace(base, prompt=c.text, seed=s))
    distance = {captioned: math.inf}
    # The SD3.5 pages' plain CFG: the negative guides every step, with no window and no zero-out.
    plain_cfg = replace(base, negative_window=False)
    variants: dict[str, Callable[[world.Caption, int], GenerationRequest]] = {
        "negative prompt = the shape's colour": lambda c, s: replace(
            base, prompt=c.text, seed=s, negative_prompt=c.colour
        ),
        "window stop 0.5 (zero negative ends half-way)": lambda c, s: replace(
            base, prompt=c.text, seed=s, cond_stop=0.5
        ),
        "window start 0.5 (gap after the real negative)": lambda c, s: replace(
            base, prompt=c.text, seed=s, cond_start=0.5
        ),
        "plain CFG (no window), no negative": lambda c, s: replace(plain_cfg, prompt=c.text, seed=s),
        "plain CFG (no window), negative = colour": lambda c, s: replace(
            plain_cfg, prompt=c.text, seed=s, negative_prompt=c.colour
        ),
    }
    for label, make in variants.items():
        distance[label] = quality.mean_psnr(row(label, make), reference)
    print(f"## Controls at {args.size} px over {len(pairs)} prompts (share of the shape colour's pixels)")
    table(
        ["setting", "colour share", "PSNR vs captioned (dB)"],
        [[label, float(np.mean(values)), distance[label]] for label, values in shares.items()],
    )
    # The same prompt and seed on both sides, so the difference is paired: its standard error says
    # whether a set of this size can tell the control's effect from the noise of single images.
    print("Paired differences of the share (mean ± standard error; pairs where it is lower):")
    for label, than in (
        ("negative prompt = the shape's colour", captioned),
        ("plain CFG (no window), negative = colour", "plain CFG (no window), no negative"),
    ):
        _paired(f"{label} − {than}", shares[label], shares[than])
    _open_colour(generator, base, count=len(pairs), seed=args.seed + 1)


def _open_colour(generator: SD3Generator, base: GenerationRequest, *, count: int, seed: int) -> None:
    # The negatives above name a colour the prompt asks for, so the two pull against each other;
    # here the prompt leaves the colour open and the negative names the one each seed would draw.
    prompts = quality.open_colour_prompts(count, seed=seed)
    print(f"## A negative prompt naming the colour that a kind-only prompt draws ({count} prompts)")
    rows: list[list[object]] = []
    settings = {"hosted window": base, "plain CFG (no window)": replace(base, negative_window=False)}
    for label, setting in settings.items():
        steering = quality.negative_steering(generator, prompts, setting)
        change, error, fell = steering.paired()
        rows.append(
            [
                label,
                steering.read,
                f"{steering.kept}/{steering.read}",
                float(np.mean(steering.before)),
                float(np.mean(steering.after)),
                f"{change:+.3f} ± {error:.3f}",
                f"{fell}/{steering.read}",
            ]
        )
    table(
        ["setting", "shapes read", "colour kept", "share before", "share after", "paired change", "lower in"],
        rows,
    )


def _paired(
    label: str, a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray | None = None
) -> None:
    """Print the mean of a − b pair by pair (of a, where it holds the differences), its standard error,
    and in how many pairs the difference is negative."""
    mean, error, lower = quality.paired_difference(a, b)
    print(f"  {label}: {mean:+.3f} ± {error:.3f}; lower in {lower}/{len(a)}")


def _set_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The distance between two token sets under their best one-to-one matching. SD3's transformer
    gives context tokens no positions, so it sees a context as this set, not as a sequence."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(a, b) ** 2
    rows, cols = linear_sum_assignment(cost.numpy())
    return float(cost[rows, cols].sum().sqrt())


def _where_words_live(context: Callable[[str], torch.Tensor], t5_start: int) -> None:
    """Over pairs of colours: how much of the T5 part's difference between captions that differ in
    the shape's colour lies at that word's own positions (the ones a weight moves), and how far
    apart, as token sets, two captions lie that swap the shape's and the background's colours,
    against two that change one colour. A weight can only steer a model through the first; the
    model can only tell the shape's colour from the background's through the second."""
    own, swap = [], []
    for caption, third in quality.colour_word_probes():
        own.append(quality.own_position_share(context, caption, third, t5_start))
        plain = context(caption.text)
        swapped = context(replace(caption, colour=caption.background, background=caption.colour).text)
        changed = context(replace(caption, background=third).text)
        swap.append(_set_distance(plain, swapped) / _set_distance(plain, changed))
    print(
        f"Share of a shape-colour change's T5 difference at the word's own positions: {np.mean(own):.3f}; "
        f"colours swapped against one changed, as token sets: {np.mean(swap):.3f} "
        f"(means over {len(own)} colour pairs)"
    )


def weights(generator: SD3Generator, args: argparse.Namespace) -> None:
    from pipelines.text import CLIP_CHUNK

    # The conditioning first: how far a weight on the colour word moves the context along the
    # difference between two captions that differ in that word alone (the direction a heavier
    # "red" would have to go), and how that difference is spread over CLIP's part and T5's.
    red = world.parse_caption("a red circle on a blue background")
    green = world.parse_caption("a green circle on a blue background")

    def context(text: str) -> torch.Tensor:
        return generator.encode(text).context[0].float()

    one, other = context(red.text), context(green.text)
    apart = one - other
    t5_share = float((apart[CLIP_CHUNK:] ** 2).sum() / (apart**2).sum())
    print(f"## (colour:w) in the conditioning: {red.text!r} against {green.text!r}")
    print(f"Share of their difference (squared norm) in the T5 part: {t5_share:.3f}")
    rows: list[list[object]] = []
    for weight in (0.0, 0.5, 1.5, 3.0):
        moved = context(quality.weighted_text(red, weight)) - one
        along = float((moved * apart).sum() / (apart**2).sum())
        rows.append([weight, float(moved.norm() / apart.norm()), along])
    table(["w", "|moved| / |difference|", "moved along the difference"], rows)
    _where_words_live(context, CLIP_CHUNK)

    # Then the images: the shape colour's share and the judge's reading of it at four weights.
    pairs = quality.prompt_seed_pairs(args.pairs, seed=args.seed + 4, positioned=0.0)
    base = replace(DEFAULTS, width=args.size, height=args.size)
    images = {
        weight: [
            generator.generate(replace(base, prompt=quality.weighted_text(c, weight), seed=s)).images[0]
            for c, s in pairs
        ]
        for weight in (0.0, 0.5, 1.0, 1.5)
    }
    shares = {
        w: np.array([quality.colour_share(im, c.colour) for im, (c, _) in zip(ims, pairs, strict=True)])
        for w, ims in images.items()
    }
    print(f"## (colour:w) in the image at {args.size} px over {len(pairs)} prompts without a position word")
    table(
        ["w", "colour share", "shape colour read", "PSNR vs w = 1 (dB)"],
        [
            [
                w,
                float(shares[w].mean()),
                quality.adherence_of(pairs, ims).colour,
                quality.mean_psnr(ims, images[1.0]),
            ]
            for w, ims in images.items()
        ],
    )
    print("Paired share:")
    _paired("w 0.5 − w 1.5", shares[0.5], shares[1.5])
    _paired("w 0 − w 1", shares[0.0], shares[1.0])


def _swaps(caption: world.Caption, attribute: str) -> list[world.Caption]:
    """`caption` with `attribute` set to each other value the world allows (colours must differ)."""
    values = {
        "colour": world.COLOURS,
        "background": world.COLOURS,
        "shape": world.SHAPES,
        "position": world.POSITIONS,
    }[attribute]
    swapped = []
    for value in values:
        if value == getattr(caption, attribute):
            continue
        try:
            swapped.append(replace(caption, **{attribute: value}))
        except ValueError:  # the shape's colour on a background of that colour
            continue
    return swapped


def words(generator: SD3Generator, args: argparse.Namespace) -> None:
    from pipelines.text import CLIP_CHUNK

    pairs = quality.prompt_seed_pairs(args.word_captions, seed=args.seed + 5, positioned=1.0)
    captions = [caption for caption, _ in pairs]
    rows: list[list[object]] = []
    for attribute in ("colour", "background", "shape", "position"):
        found: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}
        for caption in captions:
            one = generator.encode(caption.text)
            for other in _swaps(caption, attribute):
                two = generator.encode(other.text)
                if one.context.shape != two.context.shape:  # a T5 part past its minimum length
                    continue
                apart = (one.context - two.context)[0].float()
                context = float(apart.norm() / one.context.float().norm())
                pooled = float((one.pooled - two.pooled).float().norm() / one.pooled.float().norm())
                t5 = float((apart[CLIP_CHUNK:] ** 2).sum() / (apart**2).sum())
                found[len(other.text) == len(caption.text)].append((context, pooled, t5))
        for same, values in found.items():
            if values:
                ctx, pooled, t5 = np.array(values).T
                length = "same length" if same else "other length"
                rows.append([attribute, length, len(values), ctx.mean(), ctx.min(), pooled.mean(), t5.mean()])
    print(
        f"## Conditioning distance between captions that differ in one word ({len(captions)} captions "
        "with a position word, each against every other value of the attribute)"
    )
    table(
        [
            "word",
            "captions",
            "swaps",
            "|Δcontext| / |context|",
            "smallest",
            "|Δpooled| / |pooled|",
            "T5 share of Δ²",
        ],
        rows,
    )


def convergence(generator: SD3Generator, args: argparse.Namespace) -> None:
    from schedulers.names import public_names, resolve

    samplers: dict[str, str] = {}
    for name in public_names():
        spec = resolve(name)
        if spec.schedule == "sgm_uniform" and spec.guidance_factor == 1.0:
            samplers.setdefault(spec.sampler, name)
    pairs = quality.prompt_seed_pairs(args.convergence_prompts, seed=args.seed + 2)
    base = replace(DEFAULTS, width=args.size, height=args.size)

    def images(scheduler: str, steps: int) -> list[np.ndarray]:
        return [
            generator.generate(replace(base, prompt=c.text, seed=s, scheduler=scheduler, steps=steps)).images[
                0
            ]
            for c, s in pairs
        ]

    exact = images("dpmpp_2m", args.reference_steps)
    rows = []
    for sampler, name in samplers.items():
        own = images(name, args.reference_steps)
        at = {n: images(name, n) for n in CONVERGENCE_STEPS}
        rows.append(
            [
                sampler,
                *(quality.mean_psnr(at[n], exact) for n in CONVERGENCE_STEPS),
                *(quality.mean_psnr(at[n], own) for n in CONVERGENCE_STEPS),
            ]
        )
    print(
        f"## Convergence at {args.size} px, {len(pairs)} prompts: PSNR (dB) against DPM++ 2M at "
        f"{args.reference_steps} steps | against the same sampler at {args.reference_steps} steps"
    )
    table(
        ["sampler", *(f"{n} exact" for n in CONVERGENCE_STEPS), *(f"{n} own" for n in CONVERGENCE_STEPS)],
        rows,
    )


def _closeness(images: list[np.ndarray], reference: list[np.ndarray]) -> list[object]:
    """PSNR of the error pooled over all pairs (the mean squared error first, then dB: the worst pairs
    weigh most) and the mean over pairs of SSIM, each image against its own pair's reference."""
    ssim = [quality.ssim(a, b) for a, b in zip(images, reference, strict=True)]
    return [quality.mean_psnr(images, reference), float(np.mean(ssim))]


def _closeness_and_adherence(
    pairs: Sequence[tuple[world.Caption, int]], images: list[np.ndarray], reference: list[np.ndarray]
) -> list[object]:
    """`_closeness`, then the judge's background, shape colour, shape and position shares."""
    score = quality.adherence_of(pairs, images)
    return [*_closeness(images, reference), score.background, score.colour, score.shape, score.position]


def settings(model: str, generator: SD3Generator, args: argparse.Namespace) -> None:
    pairs = quality.prompt_seed_pairs(8, seed=args.seed + 3)
    requests = [replace(DEFAULTS, prompt=c.text, seed=s, width=args.size, height=args.size) for c, s in pairs]
    exact = [generator.generate(r).images[0] for r in requests]
    rows: list[list[object]] = []

    def row(label: str, images: list[np.ndarray]) -> None:
        rows.append([label, *_closeness(images, exact)])

    batched = [r.images[0] for r in generator.generate_batch(requests)]
    row("8 requests in one batch", batched)
    bf16 = load(model, dtype="bf16")
    row("bf16 weights and activations", [bf16.generate(r).images[0] for r in requests])
    int8 = load(model, performance={"quantize": "int8"})
    row("transformer in int8 (torchao)", [int8.generate(r).images[0] for r in requests])
    for label, memory in (
        ("VAE tiling", {"mode": "device", "vae_tiling": "on", "attention_slicing": "off"}),
        ("attention slicing", {"mode": "device", "vae_tiling": "off", "attention_slicing": "on"}),
        ("T5 in 8-bit", {"mode": "device", "t5": "8bit", "vae_tiling": "off", "attention_slicing": "off"}),
        ("no T5", {"mode": "device", "t5": "off", "vae_tiling": "off", "attention_slicing": "off"}),
    ):
        try:
            other = load(model, memory=memory)
        except Exception as exc:  # a mode this machine cannot run (e.g. bitsandbytes missing) is reported
            rows.append([label, f"skipped: {exc}", ""])
            continue
        row(label, [other.generate(r).images[0] for r in requests])
    print(f"## Settings against the exact fp32 image at {args.size} px, {len(requests)} prompts")
    table(["setting", "PSNR (dB)", "SSIM"], rows)


def emulated_variants() -> dict[str, str]:
    """The approximations this CPU would only emulate, each with why: their images are what any CPU
    gives, but on an AVX2-only EPYC bf16 took 6x and torchao's int8 transformer 15.6x fp32's time
    (benchmarks/README.md, cpu_matmul.py), hours over 100 pairs for a speed-up that is not there.
    int8 is emulated only where it would run torchao's kernel without VNNI or AMX: an x86 CPU without
    them gets oneDNN's (pipelines/transformer_quantization.py)."""
    from pipelines.loading import cpu_has_native_bf16
    from pipelines.transformer_quantization import quantization_caveat

    emulated = {}
    if not cpu_has_native_bf16():
        emulated["bf16"] = "this CPU has neither AVX512-BF16 nor AMX, so bf16 is emulated, slower than fp32"
    if quantization_caveat("int8", device=torch.device("cpu")) is not None:
        emulated["int8"] = (
            "this CPU has neither VNNI nor AMX nor oneDNN's kernel, so int8 matmuls are emulated"
        )
    return emulated


def approximations(model: str, generator: SD3Generator, args: argparse.Namespace) -> None:
    """Every opt-in approximation (and bf16, the CPU default where it is native) against the exact fp32
    loop: closeness, adherence, work skipped and speed-up, over the same prompt×seed pairs. The
    variants take turns pair by pair after a warm-up (`quality.generate_in_turn`), so the machine's
    noise falls on all of them alike."""
    from pipelines.step_cache import LEVELS

    pairs = quality.prompt_seed_pairs(args.pairs, seed=args.seed + 4)
    base = replace(DEFAULTS, width=args.size, height=args.size)
    cached = [level for level in LEVELS if level != "off"]
    emulated = emulated_variants()
    for name, why in emulated.items():
        verb = "runs anyway (--all-variants)" if args.all_variants else "left out (--all-variants runs it)"
        print(f"{name}: {verb}: {why}", flush=True)
    bf16 = load(model, dtype="bf16") if args.all_variants or "bf16" not in emulated else None
    variants: dict[str, tuple[SD3Generator, GenerationRequest]] = {"exact (fp32)": (generator, base)}
    if bf16 is not None:
        variants["bf16"] = (bf16, base)
    if args.all_variants or "int8" not in emulated:
        variants["int8 transformer"] = (load(model, performance={"quantize": "int8"}), base)
    variants |= {f"cache {level}": (generator, replace(base, step_cache=level)) for level in cached}
    if bf16 is not None:
        variants |= {f"bf16 + cache {level}": (bf16, replace(base, step_cache=level)) for level in cached}
    results = quality.generate_in_turn(variants, pairs)
    images = {label: [out.images[0] for out in outs] for label, outs in results.items()}
    skipped = {
        label: [out.timings.get("cache_skipped", 0.0) for out in outs] for label, outs in results.items()
    }
    seconds = {label: sum(out.timings["sample"] for out in outs) for label, outs in results.items()}
    exact = images["exact (fp32)"]
    rows: list[list[object]] = []
    for label in variants:
        rows.append(
            [
                label,
                *_closeness_and_adherence(pairs, images[label], exact),
                float(np.mean(skipped[label])),
                seconds["exact (fp32)"] / seconds[label],
            ]
        )
    print(
        f"## Approximations against the exact fp32 loop at {args.size} px over {len(pairs)} prompt×seed pairs"
    )
    table(
        [
            "variant",
            "PSNR (dB)",
            "SSIM",
            "background",
            "shape colour",
            "shape",
            "position",
            "skipped",
            "speed-up",
        ],
        rows,
    )


def few_step(model: str, generator: SD3Generator, args: argparse.Namespace) -> None:
    """The distilled few-step LoRA (pipelines/toy/distill.py) against its teacher, the API defaults:
    closeness to the teacher's image from the same seed, adherence, transformer forwards an image and
    the sampling speed-up, beside the base model at the same few Euler steps with and without CFG.
    The variants take turns pair by pair after a warm-up (`quality.generate_in_turn`), so the
    machine's noise falls on all of them alike."""
    from pipelines.toy import distill

    lora = str(args.lora)
    student = load(model, lora=[lora])
    # Named by their whole path, as --lora is: two runs' folders often share a last name.
    others = {str(o): load(model, lora=[str(o)]) for o in args.also_lora}
    pairs = quality.prompt_seed_pairs(args.pairs, seed=args.seed + 6)
    teacher = distill.teacher_request(args.size)
    sampler = args.few_sampler
    variants: dict[str, tuple[SD3Generator, GenerationRequest]] = {
        "teacher: API defaults": (generator, teacher)
    }
    for steps in args.few_steps:
        fast = replace(distill.student_request(args.size, steps), scheduler=sampler)
        guided = replace(fast, guidance_scale=DEFAULTS.guidance_scale)
        variants |= {
            f"base, {sampler} {steps}, CFG 5": (generator, guided),
            f"base, {sampler} {steps}, CFG 1": (generator, fast),
            f"LoRA, {sampler} {steps}, CFG 1": (student, fast),
        }
        variants |= {f"LoRA {name}, {sampler} {steps}, CFG 1": (o, fast) for name, o in others.items()}
        if steps % 2 == 0:  # the same work as the LoRA's: plain few-step CFG at half the steps
            variants[f"base, {sampler} {steps // 2}, CFG 5"] = (generator, replace(guided, steps=steps // 2))
    results = quality.generate_in_turn(variants, pairs)
    images = {label: [out.images[0] for out in outs] for label, outs in results.items()}
    seconds = {label: sum(out.timings["sample"] for out in outs) for label, outs in results.items()}
    exact = images["teacher: API defaults"]
    rows: list[list[object]] = []
    for label, (_, base) in variants.items():
        # Counted as the server prices them, so a sampler of two calls a step (Heun) is counted so.
        forwards = model_evaluations(
            scheduler=base.scheduler, steps=base.steps, shift=base.shift, guidance_scale=base.guidance_scale
        )
        rows.append(
            [
                label,
                forwards,
                *_closeness_and_adherence(pairs, images[label], exact),
                seconds["teacher: API defaults"] / seconds[label],
            ]
        )
    print(f"## The few-step LoRA {lora} against its teacher at {args.size} px over {len(pairs)} pairs")
    table(
        [
            "variant",
            "forwards",
            "PSNR (dB)",
            "SSIM",
            "background",
            "shape colour",
            "shape",
            "position",
            "speed-up",
        ],
        rows,
    )
    if others:

        def gains(label: str, over: str) -> list[float]:  # 0 where both equal the teacher's: not inf − inf
            return [quality.psnr_gain(*p) for p in zip(images[label], images[over], exact, strict=True)]

        print(f"PSNR (dB) to the teacher's image, pair by pair, against {lora}'s:")
        for steps in args.few_steps:
            for name in others:
                gain = gains(f"LoRA {name}, {sampler} {steps}, CFG 1", f"LoRA, {sampler} {steps}, CFG 1")
                _paired(f"{name} − it, {steps} steps", gain)


GUIDANCE_FIT_SIGMAS = (1.0, 0.98, 0.95, 0.9, 0.8, 0.6, 0.4, 0.2)


@torch.no_grad()
def guidance_fit(model: str, generator: SD3Generator, args: argparse.Namespace, *, count: int = 16) -> None:
    """Mean squared error of each model's velocity at guidance 1 against the teacher's CFG velocity
    (pipelines/toy/distill.py `guided_velocity`), at each σ on `count` renders noised with one draw."""
    from pipelines.toy import distill
    from pipelines.toy.train import CaptionBank, LatentPool, velocity

    student, size = load(model, lora=[str(args.lora)]), args.size
    pool = LatentPool(generator.pipe.vae, np.random.default_rng(5), size=size, count=count)
    bank = CaptionBank(generator.pipe)
    positive = bank.get([c.text for c in pool.captions])
    negative = (bank.empty_context[None], bank.empty_pooled[None])
    teacher = distill.teacher_request(size)
    guidance, ranges = teacher.guidance_scale, generator.negative_ranges(teacher)
    eps = torch.randn(pool.latents.shape, generator=torch.Generator().manual_seed(1))
    rows: list[list[object]] = []
    for sigma in GUIDANCE_FIT_SIGMAS:
        sigmas = torch.full((count,), sigma)
        x = (1.0 - sigma) * pool.latents + sigma * eps
        target = distill.guided_velocity(
            generator.pipe.transformer, x, sigmas, positive, negative, cfg=guidance, ranges=ranges
        )
        errors = [
            float((velocity(runner.pipe.transformer, x, sigmas, *positive) - target).pow(2).mean())
            for runner in (generator, student)
        ]
        rows.append([sigma, float(target.pow(2).mean()), *errors])
    print(f"## Velocity at guidance 1 against the teacher's CFG {guidance:g} velocity, {count} renders")
    table(["σ", "target's mean square", "base: squared error", "LoRA: squared error"], rows)


def _positive(text: str) -> int:
    count = int(text)
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a positive count, got {text}")
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--only", action="append", choices=SECTIONS)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument(
        "--pairs",
        type=_positive,
        default=120,
        help="prompt×seed pairs for adherence, approximations, weights and few-step (controls: an 8th, ≥ 8)",
    )
    parser.add_argument(
        "--no-cfg1",
        dest="cfg1",
        action="store_false",
        help="adherence at the API defaults only (half the time)",
    )
    parser.add_argument(
        "--save-images",
        type=Path,
        help="adherence: also write every image judged, as PNG, under DIR/<setting>/ with its pairs",
    )
    parser.add_argument(
        "--rejudge",
        type=Path,
        help="adherence: read the images a --save-images run wrote under DIR instead of generating them",
    )
    parser.add_argument(
        "--judge-size",
        type=int,
        help="with --rejudge: resize each saved image to N × N px (box filter) before the judge reads it",
    )
    parser.add_argument(
        "--shift",
        type=float,
        default=DEFAULTS.shift,
        help="adherence: the sampling shift (modelsamplingsd3_shift; the API's default unless told)",
    )
    parser.add_argument("--probe-pairs", type=int, default=48, help="noised renders for `decided`")
    parser.add_argument("--word-captions", type=int, default=24, help="base captions for `words`")
    parser.add_argument("--convergence-prompts", type=int, default=4)
    parser.add_argument("--reference-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lora",
        type=Path,
        help="the few-step LoRA that `few-step` measures (python -m pipelines.toy.distill)",
    )
    parser.add_argument(
        "--also-lora",
        type=Path,
        action="append",
        default=[],
        help="`few-step`: another LoRA beside --lora's (repeatable), with its paired PSNR difference",
    )
    parser.add_argument(
        "--few-steps", type=int, nargs="+", default=FEW_STEPS, help="`few-step`: the step counts"
    )
    parser.add_argument("--few-sampler", default="Euler", help="`few-step`: the sampler of the fast variants")
    parser.add_argument(
        "--all-variants",
        action="store_true",
        help="`approximations`: also bf16 and int8 on a CPU that only emulates them (hours, not minutes)",
    )
    args = parser.parse_args()
    sections = args.only or [s for s in SECTIONS if s not in LORA_SECTIONS or args.lora is not None]
    if args.lora is None and set(sections) & set(LORA_SECTIONS):
        parser.error(
            "the few-step and guidance-fit sections need --lora: a folder written by "
            "python -m pipelines.toy.distill"
        )
    if args.judge_size is not None and (args.rejudge is None or args.judge_size < 16):
        parser.error("--judge-size resizes the images --rejudge reads: use it with --rejudge, N ≥ 16")
    if args.rejudge is not None:
        if sections != ["adherence"]:
            parser.error("--rejudge reads saved adherence images: use it with --only adherence")
        adherence(None, args)  # no model loaded: the judge alone, on the saved pixels
        return
    generator = load(args.model)
    for section in sections:
        started = time.perf_counter()
        if section == "adherence":
            adherence(generator, args)
        elif section == "decided":
            decided(generator, args)
        elif section == "controls":
            controls(generator, args)
        elif section == "weights":
            weights(generator, args)
        elif section == "words":
            words(generator, args)
        elif section == "convergence":
            convergence(generator, args)
        elif section == "approximations":
            approximations(args.model, generator, args)
        elif section == "few-step":
            few_step(args.model, generator, args)
        elif section == "guidance-fit":
            guidance_fit(args.model, generator, args)
        else:
            settings(args.model, generator, args)
        print(f"({section}: {time.perf_counter() - started:.0f} s)\n", flush=True)


if __name__ == "__main__":
    main()
