"""The opt-in step cache (pipelines/step_cache.py): its forward is diffusers' forward, reuse adds back
exactly what the skipped blocks added, and its bookkeeping follows the policy. What it costs in image
quality is measured on the trained toy by benchmarks/quality.py, not asserted here."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from pipelines.loading import ModelSpec, load_model
from pipelines.request import GenerationRequest
from pipelines.sd3 import SD3Generator, batch_key
from pipelines.step_cache import LEVELS, StepCache, StepCachePolicy, _Entry, policy_for, relative_move

NEVER = StepCachePolicy(threshold=0.0)  # a change is never below 0: every forward runs whole
ALWAYS = StepCachePolicy(threshold=float("inf"), warmup=2, max_consecutive=3)


@pytest.fixture(scope="module", params=["tiny:sd3-medium", "tiny:sd3.5-large", "tiny:sd3.5-medium"])
def transformer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    # SD3 Medium, SD3.5 Large (qk-norm) and SD3.5 Medium (MMDiT-X dual attention) blocks.
    tiny = tmp_path_factory.mktemp("tiny")
    return load_model(
        ModelSpec(source=request.param, tiny_dir=tiny, device="cpu", dtype="fp32")
    ).pipe.transformer


def _inputs(transformer: Any, seed: int, *, batch: int = 2, size: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    config = transformer.config
    return {
        "hidden_states": torch.randn(batch, config.in_channels, size, size, generator=g),
        "timestep": torch.full((batch,), 700.0),
        "encoder_hidden_states": torch.randn(batch, 12, config.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(batch, config.pooled_projection_dim, generator=g),
    }


@torch.inference_mode()
def test_a_forward_that_runs_every_block_is_diffusers_forward_bit_for_bit(transformer: Any) -> None:
    inputs = _inputs(transformer, 0)
    expected = transformer(**inputs, return_dict=False)[0]
    cache = StepCache(NEVER)
    for _ in range(3):
        assert torch.equal(cache.forward(transformer, ("positive",), **inputs), expected)
    assert (cache.computed, cache.reused) == (3, 0)


@torch.inference_mode()
def test_a_reused_forward_adds_back_what_the_skipped_blocks_added(transformer: Any) -> None:
    inputs = _inputs(transformer, 1)
    expected = transformer(**inputs, return_dict=False)[0]
    cache = StepCache(ALWAYS)
    for _ in range(2):  # the warm-up runs whole
        cache.forward(transformer, ("positive",), **inputs)
    reused = cache.forward(transformer, ("positive",), **inputs)
    assert cache.reused == 1
    # first block's output + (all blocks' output − first block's output): equal up to float rounding
    torch.testing.assert_close(reused, expected, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_reuse_waits_for_the_warm_up_and_is_bounded_in_a_row(transformer: Any) -> None:
    inputs = _inputs(transformer, 2)
    cache = StepCache(ALWAYS)
    pattern = []
    for _ in range(10):
        before = cache.reused
        cache.forward(transformer, ("positive", "negative"), **inputs)
        pattern.append("r" if cache.reused > before else "w")
    assert "".join(pattern) == "wwrrrwrrrw"
    assert cache.skipped_share == pytest.approx(0.6)


@torch.inference_mode()
def test_a_forward_reuses_only_what_a_forward_over_the_same_rows_left(transformer: Any) -> None:
    cache = StepCache(ALWAYS)
    first, other = _inputs(transformer, 3), _inputs(transformer, 4)
    for _ in range(2):
        cache.forward(transformer, ("positive", "negative"), **first)
    # The negative window handed over to the zeroed-out conditioning: a new key, so it runs whole.
    expected = transformer(**other, return_dict=False)[0]
    assert torch.equal(cache.forward(transformer, ("positive", "zero"), **other), expected)
    # A different latent size under the same key cannot reuse either.
    smaller = _inputs(transformer, 5, size=4)
    expected = transformer(**smaller, return_dict=False)[0]
    assert torch.equal(cache.forward(transformer, ("positive", "negative"), **smaller), expected)
    assert cache.reused == 0


@torch.inference_mode()
def test_the_threshold_is_on_the_relative_l1_change_of_the_first_blocks_residual() -> None:
    cache = StepCache(StepCachePolicy(threshold=0.05, warmup=1))
    reference = torch.ones(1, 4, 8)
    entry = _Entry(first_residual=reference, tail_residual=torch.zeros(1, 4, 8))
    assert cache._may_reuse(entry, reference * 1.04)
    assert not cache._may_reuse(entry, reference * 1.06)
    assert not cache._may_reuse(entry, torch.ones(1, 5, 8))  # another shape: never


def test_the_relative_move_is_taken_in_fp32_and_survives_a_zero_reference() -> None:
    reference = torch.full((1, 64, 64), 1.0, dtype=torch.bfloat16)
    residual = reference.clone()
    residual[0, 0, 0] = 2.0  # one element in 4096 moves by 1
    assert relative_move(residual, reference) == pytest.approx(1 / 4096, rel=1e-6)  # bf16 keeps ~3 digits
    assert relative_move(torch.ones(3), torch.zeros(3)) > 1e9  # not a NaN: never "below threshold"


def test_levels_are_named_and_an_unknown_one_is_refused() -> None:
    assert policy_for("off") is None
    assert set(LEVELS) == {"off", "fast", "faster"}
    fast, faster = policy_for("fast"), policy_for("faster")
    assert fast is not None and faster is not None and fast.threshold < faster.threshold
    with pytest.raises(ValueError, match="unknown step cache level 'turbo'"):
        policy_for("turbo")


@pytest.fixture(scope="module")
def generator(tmp_path_factory: pytest.TempPathFactory) -> SD3Generator:
    tiny = tmp_path_factory.mktemp("tiny")
    return SD3Generator(
        load_model(ModelSpec(source="tiny:sd3-medium", tiny_dir=tiny, device="cpu", dtype="fp32"))
    )


def test_the_default_request_runs_the_exact_loop_and_says_nothing_of_a_cache(generator: SD3Generator) -> None:
    request = GenerationRequest(prompt="a red circle", width=64, height=64, steps=6, seed=3)
    result = generator.generate(request)
    assert "cache_skipped" not in result.timings
    again = generator.generate(replace(request, step_cache="off"))
    assert (again.images[0] == result.images[0]).all()


def test_an_opted_in_request_reports_the_share_it_skipped(
    generator: SD3Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Random weights move too much between steps for a real threshold: reuse whatever moved.
    monkeypatch.setitem(LEVELS, "faster", StepCachePolicy(threshold=float("inf"), max_consecutive=2))
    request = GenerationRequest(prompt="a red circle", width=64, height=64, steps=12, seed=3)
    exact = generator.generate(request)
    cached = generator.generate(replace(request, step_cache="faster"))
    # DPM++ 2M's 12 forwards, over (positive, negative) and then (positive, zero) once the negative
    # window ends: each key's first two run whole, then at most two reuses in a row.
    assert cached.timings["cache_skipped"] == pytest.approx(6 / 12)
    assert not (cached.images[0] == exact.images[0]).all()


def test_cache_levels_never_share_a_batch() -> None:
    request = GenerationRequest(prompt="x", width=64, height=64)
    assert batch_key(request) != batch_key(replace(request, step_cache="fast"))
