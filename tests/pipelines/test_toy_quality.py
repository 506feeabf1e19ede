"""What the trained toy SD3 (`--model toy`, the committed weights) does, measured by the judge.

Each test generates a handful of images through the serving code and checks a direction or a bound
that `benchmarks/quality.py` measured over many more prompt×seed pairs (docs/toy.md §34 has those
figures for the committed weights, run 35). They are skipped in a checkout without the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import pipelines.toy
from pipelines.request import GenerationRequest
from pipelines.sd3 import SD3Generator
from pipelines.toy import quality, world
from server.config import Settings
from server.runtime import load_runtime

pytestmark = pytest.mark.skipif(
    not (pipelines.toy.MODEL_DIR / "model_index.json").exists(),
    reason="the toy's weights are not in this checkout (python -m pipelines.toy.train pipelines/toy/model)",
)

DEFAULTS = GenerationRequest(prompt="")  # the API's: DPM++ 2M, 25 steps, CFG 5, shift 3


def _load(
    tmp: Path, *, model: dict[str, str] | None = None, memory: dict[str, str] | None = None
) -> SD3Generator:
    if memory is None:
        memory = {"mode": "device", "vae_tiling": "off", "attention_slicing": "off"}
    # fp32 unless told: the exact reference (auto is bf16 on CPUs with native bf16).
    model = {"id": "toy", "device": "cpu", "dtype": "fp32", **(model or {})}
    settings = Settings(data_dir=tmp, model=model, memory=memory)
    generator = load_runtime(settings).generator
    assert isinstance(generator, SD3Generator)
    return generator


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> SD3Generator:
    return _load(tmp_path_factory.mktemp("toy"))


def _mean_share(
    generator: SD3Generator,
    pairs: list[tuple[world.Caption, int]],
    make: Callable[[world.Caption, int], GenerationRequest],
) -> float:
    shares = []
    for caption, seed in pairs:
        image = generator.generate(make(caption, seed)).images[0]
        shares.append(quality.colour_share(image, caption.colour))
    return float(np.mean(shares))


def test_images_follow_their_prompts_at_the_api_defaults_at_512_px(toy: SD3Generator) -> None:
    pairs = quality.prompt_seed_pairs(16, seed=11)
    score = quality.adherence(toy, pairs, replace(DEFAULTS, width=512, height=512))
    assert score.background >= BOUNDS["background"], score
    assert score.colour >= BOUNDS["colour"], score
    # The shape's kind, as the judge reads it (docs/toy.md §27), is right 0.79 / 0.76 / 0.64 of the
    # time at 512 px over three sets of 100 pairs (`quality.py --only adherence --pairs 100 --size 512
    # --seed 0/1/2`, §33): 0.90 / 0.94 / 0.90 with a position word, and 0.68 / 0.58 / 0.38
    # without one, where the toy draws one large blob with ragged edges. The positioned share is
    # asserted, the one a regression shows first: 8 of these 16 pairs name a position, and 6 of 8
    # is the bound (at 0.90 a draw of 8 falls under it about 4 % of the time), and issue 13's 60 %
    # over all 16 (run 35 reads 12 of them, all 8 positioned and 4 of the 8 others; the pairs
    # and seeds are fixed, so these are run 35's fixed answers, checked here against regressions of
    # the weights or the judge).
    assert score.by_position["with"]["count"] == 8
    assert score.by_position["with"]["shape"] >= 0.75, score
    assert score.shape >= 0.6, score


def test_guidance_makes_images_follow_their_prompts_better_than_none(toy: SD3Generator) -> None:
    # Over 100 pairs at 256 px (`quality.py --only adherence --size 256 --pairs 100`, docs/toy.md
    # §34) CFG 5 reads background / shape colour / kind 0.95 / 0.99 / 0.72 and CFG 1 0.89 / 0.96 /
    # 0.55: the colours alone nearly saturate at CFG 5, so the test sums all three. On run 24 that sum
    # differed by about 0.08, and a pair's sum moves in steps of a third: 16 pairs are about one
    # standard error of it (on them run 21 read 2.25 against 2.38), so the test takes 48.
    pairs = quality.prompt_seed_pairs(48, seed=12)
    base = replace(DEFAULTS, width=256, height=256)
    guided = quality.adherence(toy, pairs, base)
    unguided = quality.adherence(toy, pairs, replace(base, guidance_scale=1.0))

    def read(score: quality.Adherence) -> float:
        return score.background + score.colour + score.shape

    assert read(guided) > read(unguided), (guided, unguided)


def test_a_negative_prompt_naming_the_shape_colour_lowers_its_share(toy: SD3Generator) -> None:
    # The negative prompt guiding every step, as the SD3.5 pages use it (negative_window=False). Under
    # the txt2img page's window (docs/sampling.md §5.2) the real negative is evaluated on only the first
    # 3 of 25 steps, above σ 0.964, and the zero-out guides the rest; with a prompt that names the
    # colour it asks the toy not to draw, the share moves by about a percent either way there
    # (docs/toy.md §13), which no test on 8 images can tell from noise. Under plain CFG the committed
    # toy's share falls by 3 % (0.290 → 0.281 over 48 prompts, paired −0.010 ± 0.007, lower in 33:
    # `quality.py --only controls --size 256 --pairs 384`, docs/toy.md §34; run 24 −0.028 ± 0.009,
    # run 5 by half), within two standard errors of nothing: since the shapes without a position
    # word are drawn twice as large (§29) the toy draws the captioned colour whatever the negative
    # says. The test asks for the direction on 16 fixed pairs, which run 35 still gives; it guards
    # the wiring of the negative prompt more than it measures the toy.
    pairs = quality.prompt_seed_pairs(16, seed=13, positioned=0.0)
    base = replace(DEFAULTS, width=256, height=256, negative_window=False)
    plain = _mean_share(toy, pairs, lambda c, s: replace(base, prompt=c.text, seed=s))
    negative = _mean_share(
        toy, pairs, lambda c, s: replace(base, prompt=c.text, seed=s, negative_prompt=c.colour)
    )
    assert negative < plain, (negative, plain)


def test_a_negative_prompt_naming_a_colour_steers_a_prompt_that_leaves_the_colour_open_away_from_it(
    toy: SD3Generator,
) -> None:
    # The test above names a colour the prompt asks for, so prompt and negative pull against each
    # other. A user's negative prompt is more often for what the prompt leaves open: here "a circle"
    # (a kind-only prompt, one of those the toy was trained on), the negative naming the colour the
    # seed draws without it. At the API's defaults, the hosted window, the real negative acts on the
    # first 3 of 25 steps only, and that is where the colour of an open prompt is chosen. Over 48
    # prompts at 256 px (`quality.py --only controls`' last table, docs/toy.md §34) the colour stays in
    # 13 and its share falls in 44 (0.146 → 0.029); under plain CFG it stays in 0 of 46. On these 8
    # fixed prompts run 35 keeps it in 2 and lowers the share in all 8 (0.106 → 0.008).
    prompts = quality.open_colour_prompts(8, seed=15)
    steering = quality.negative_steering(toy, prompts, replace(DEFAULTS, width=256, height=256))
    assert steering.read >= 6, steering
    assert steering.kept <= steering.read // 2, steering
    _, _, fell = steering.paired()
    assert fell >= steering.read - 2, steering
    assert np.mean(steering.after) < 0.5 * np.mean(steering.before), steering


def test_a_heavier_weight_on_the_colour_word_gives_more_of_that_colour_and_a_weight_of_one_is_none(
    toy: SD3Generator,
) -> None:
    # The toy was trained with the pooled vector dropped in half the steps (docs/toy.md §19), so its
    # colours are read from the context tokens that a weight scales. Over 32 pairs at 256 px
    # (`quality.py --only weights --size 256 --pairs 32`, §34) the shape colour's share is 0.180 at
    # w = 0.5 and 0.308 at 1.5, lower at 0.5 in 30 of the 32. The pairs that go the other way do so
    # by much (on run 31 a shape drawn in another colour: 0.275 → 0.027), which on 6 pairs swamped
    # the mean (0.183 against 0.201), so the test takes 16 (run 35: 0.187 against 0.268, lower in 14).
    pairs = quality.prompt_seed_pairs(16, seed=14, positioned=0.0)
    base = replace(DEFAULTS, width=256, height=256)

    def weighted(weight: float) -> Callable[[world.Caption, int], GenerationRequest]:
        return lambda c, s: replace(base, prompt=quality.weighted_text(c, weight), seed=s)

    light, heavy = _mean_share(toy, pairs, weighted(0.5)), _mean_share(toy, pairs, weighted(1.5))
    assert heavy > light + 0.02, (light, heavy)
    caption, seed = pairs[0]
    plain = toy.generate(replace(base, prompt=caption.text, seed=seed)).images[0]
    assert np.array_equal(toy.generate(weighted(1.0)(caption, seed)).images[0], plain)


def _clipped(image: np.ndarray) -> float:
    """Share of pixels with a channel at 0 or 255: what an over-guided image burns to."""
    return float(((image == 0) | (image == 255)).any(axis=-1).mean())


def test_the_negative_window_ending_early_leaves_unguided_cfg_steps_that_burn_the_image(
    toy: SD3Generator,
) -> None:
    # docs/sampling.md §5: past `stop` no negative entry is active, the uncond prediction is 0 and the
    # denoised image is cfg·D_cond, which over-saturates; at the default window nothing is left uncovered.
    pairs = quality.prompt_seed_pairs(4, seed=15)
    base = replace(DEFAULTS, width=256, height=256)
    default = [toy.generate(replace(base, prompt=c.text, seed=s)).images[0] for c, s in pairs]
    early = [toy.generate(replace(base, prompt=c.text, seed=s, cond_stop=0.5)).images[0] for c, s in pairs]
    assert np.mean([_clipped(i) for i in early]) > np.mean([_clipped(i) for i in default]) + 0.05
    assert quality.mean_psnr(early, default) < 20.0


DETERMINISTIC = ("euler", "heun", "dpmpp_2m", "lms", "deis", "uni_pc", "ipndm", "res_multistep")


@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_more_steps_come_closer_to_the_many_step_reference(toy: SD3Generator, sampler: str) -> None:
    caption, seed = quality.prompt_seed_pairs(1, seed=16)[0]
    base = replace(DEFAULTS, prompt=caption.text, seed=seed, width=128, height=128)
    reference = toy.generate(replace(base, scheduler="dpmpp_2m", steps=64)).images[0]
    error = {
        n: quality.psnr(toy.generate(replace(base, scheduler=sampler, steps=n)).images[0], reference)
        for n in (4, 32)
    }
    assert error[32] > error[4] + 3.0, error


def test_batching_bf16_and_the_memory_modes_stay_close_to_the_exact_image(
    toy: SD3Generator, tmp_path: Path
) -> None:
    pairs = quality.prompt_seed_pairs(2, seed=17)
    requests = [replace(DEFAULTS, prompt=c.text, seed=s, width=256, height=256) for c, s in pairs]
    exact = [toy.generate(r).images[0] for r in requests]
    batched = [r.images[0] for r in toy.generate_batch(requests)]
    assert quality.mean_psnr(batched, exact) >= BOUNDS["batch_psnr"]
    bf16 = _load(tmp_path / "bf16", model={"dtype": "bf16"})
    assert quality.mean_psnr([bf16.generate(r).images[0] for r in requests], exact) >= BOUNDS["bf16_psnr"]
    for memory in ({"mode": "device", "vae_tiling": "on"}, {"mode": "device", "attention_slicing": "on"}):
        other = _load(tmp_path / "-".join(memory.values()), memory=memory)
        assert (
            quality.mean_psnr([other.generate(r).images[0] for r in requests], exact) >= BOUNDS["memory_psnr"]
        ), memory


# Lower bounds. Adherence: issue 13's targets for background and shape colour, which the committed
# toy (run 35) meets with room (over 100 pairs at 256 px: 0.95 and 0.99, at 512 px: 0.99 and 0.97,
# `python benchmarks/quality.py --only adherence --pairs 100 --size N`, docs/toy.md §33, §34).
# PSNR: first estimates, from the tiny model's run of benchmarks/quality.py at 64 px (batch 92 dB,
# bf16 47 dB, tiling and slicing exact), which the toy passes too (`--only approximations`).
BOUNDS: dict[str, float] = {
    "background": 0.9,
    "colour": 0.8,
    "batch_psnr": 40.0,
    "bf16_psnr": 25.0,
    "memory_psnr": 30.0,
}


def test_the_probe_reads_a_lightly_noised_render_right_and_a_pure_noise_one_from_the_caption_alone(
    toy: SD3Generator,
) -> None:
    from pipelines.toy import MODEL_DIR, probe
    from pipelines.toy.train import trained_unpositioned_scale

    pairs = quality.prompt_seed_pairs(6, seed=5)
    scale = trained_unpositioned_scale(MODEL_DIR)  # renders of the world the toy was trained on
    scores = probe.readable_at(toy, pairs, (0.1, 1.0), size=128, unpositioned_scale=scale)
    assert list(scores) == [0.1, 1.0] and all(score.count == 6 for score in scores.values())
    # At σ = 0.1 the render shows through: every attribute reads as captioned.
    light = scores[0.1]
    assert (light.background, light.colour, light.shape, light.position) == (1.0, 1.0, 1.0, 1.0)
    # At σ = 1 the input is noise alone: the estimate is the caption's average image over every layout
    # it allows. A position word pins the layout to its cell, so the place is read from the caption
    # alone (the kind, blurred by the spread of sizes, too: 3 of 3 at 128 px; without a position word
    # the average is a wide blur, read as a kind 1 time of 3).
    assert scores[1.0].by_position["with"]["position"] == 1.0
    # The layouts and the noise are the pairs' own: the same pairs read the same.
    again = probe.readable_at(toy, pairs, (1.0,), size=128, unpositioned_scale=scale)
    assert again[1.0].as_dict() == scores[1.0].as_dict()
