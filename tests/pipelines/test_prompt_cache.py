"""Encoded prompts are cached: a repeated prompt skips the text encoders; the cache stays in budget."""

from __future__ import annotations

from functools import partial

import torch

from pipelines.prompt_cache import PromptCache
from pipelines.request import GenerationRequest
from pipelines.sd3 import SD3Generator
from server.runtime import Runtime


def test_lru_evicts_the_least_recently_used_within_the_byte_budget() -> None:
    cache = PromptCache(max_bytes=3 * 400)  # three 100-float32 tensors
    make = lambda: torch.zeros(100)  # noqa: E731
    for key in "abc":
        cache.get_or_compute(key, make)
    cache.get_or_compute("a", make)  # a is now the most recent
    cache.get_or_compute("d", make)  # evicts b
    assert len(cache) == 3 and cache.size_bytes == 1200
    computed: list[str] = []

    def compute(key: str) -> torch.Tensor:
        computed.append(key)
        return torch.zeros(100)

    for key in "acdb":
        cache.get_or_compute(key, partial(compute, key))
    assert computed == ["b"]


def test_an_entry_larger_than_the_budget_is_returned_but_not_kept() -> None:
    cache = PromptCache(max_bytes=100)
    value = cache.get_or_compute("big", lambda: torch.zeros(1000))
    assert value.numel() == 1000 and len(cache) == 0 and cache.size_bytes == 0


def test_a_repeated_prompt_skips_the_text_encoders(runtime: Runtime) -> None:
    generator = runtime.generator
    assert isinstance(generator, SD3Generator)
    generator.prompt_cache.clear()
    calls: list[int] = []
    handles = [
        encoder.register_forward_hook(lambda *_: calls.append(1))
        for encoder in (
            generator.pipe.text_encoder,
            generator.pipe.text_encoder_2,
            generator.pipe.text_encoder_3,
        )
    ]
    try:
        request = GenerationRequest(
            prompt="a cached prompt", negative_prompt="", seed=1, width=512, height=512, steps=10
        )
        first = generator.generate(request)
        encoded_first = len(calls)
        second = generator.generate(request)
    finally:
        for handle in handles:
            handle.remove()
    assert encoded_first == 6  # positive and negative, three encoders each
    assert len(calls) == encoded_first  # the second request encoded nothing
    assert (first.images[0] == second.images[0]).all()
    assert generator.prompt_cache.hits >= 2
