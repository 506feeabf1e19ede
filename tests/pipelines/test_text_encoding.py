"""ComfyUI-exact text conditioning (docs/sampling.md §8) on the tiny SD3: the prompt syntax, parity with
diffusers where both agree, CLIP chunking, untruncated T5, token weights and the no-T5 checkpoint.

The tiny CLIP tokenizers are character-level, so a 200-character prompt is well over 75 tokens.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from pipelines.sd3 import SD3Generator
from pipelines.text import MAX_WEIGHT, count_tokens, encode_prompt, parse_weights
from server.runtime import Runtime

CPU = torch.device("cpu")
CHUNK = 77
LONG = (
    "a watercolor painting of a lighthouse on a rocky cliff at dusk, waves crashing below, "
    "seagulls circling, warm light in the windows, dramatic clouds, fine paper texture, "
    "soft pastel palette, calm seas."
)  # 200 characters


@pytest.fixture(scope="module")
def pipe(runtime: Runtime) -> Any:
    assert isinstance(runtime.generator, SD3Generator)
    return runtime.generator.pipe


@pytest.fixture(scope="module")
def pipe_without_t5(tiny_dir: Path) -> Any:
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(tiny_dir, text_encoder_3=None, tokenizer_3=None)


def encode(pipe: Any, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    return encode_prompt(pipe, text, device=CPU, dtype=torch.float32)


def n_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def t5_length(pipe: Any, text: str) -> int:
    """Segments are tokenized one by one, then EOS, then padding to 77."""
    return max(77, sum(n_tokens(pipe.tokenizer_3, segment) for segment, _ in parse_weights(text)) + 1)


# -- the prompt syntax ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a cat on a mat", [("a cat on a mat", 1.0)]),
        ("(a:1.5)", [("a", 1.5)]),
        ("(a)", [("a", 1.1)]),
        ("((a))", [("a", 1.21)]),
        ("((a:1.5))", [("a", 1.5)]),  # an explicit weight replaces, it does not multiply
        ("((a):1.5)", [("a", 1.65)]),
        ("(a:0.5) b", [("a", 0.5), (" b", 1.0)]),
        ("x (a b:1.2) y", [("x ", 1.0), ("a b", 1.2), (" y", 1.0)]),
        (r"\(x\)", [("(x)", 1.0)]),
        (r"\((x:2)\)", [("(", 1.0), ("x", 2.0), (")", 1.0)]),
        ("(a", [("(a", 1.0)]),
        ("((a)", [("(a", 1.1)]),
        ("a) (b)", [("a) (b)", 1.0)]),  # ComfyUI: after a stray ")" everything is text
        ("(a:x)", [("a:x", 1.1)]),
        ("(a:nan)", [("a:nan", 1.1)]),  # non-finite weights read as text
        ("(:1.2)", [(":1.2", 1.1)]),
        ("a()b", [("a", 1.0), ("b", 1.0)]),
        ("", []),
    ],
)
def test_parse_weights_follows_comfyui_syntax(text: str, expected: list[tuple[str, float]]) -> None:
    got = parse_weights(text)
    assert [segment for segment, _ in got] == [segment for segment, _ in expected]
    assert [weight for _, weight in got] == pytest.approx([weight for _, weight in expected])


def test_parse_weights_survives_deep_nesting() -> None:
    got = parse_weights("(" * 3000 + "a" + ")" * 3000)
    assert [segment for segment, _ in got] == ["a"]


# -- parity with diffusers ------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", ["a cat on a mat", ""])
def test_short_unweighted_prompt_matches_diffusers_exactly(pipe: Any, prompt: str) -> None:
    context, pooled = encode(pipe, prompt)
    # Under inference_mode, as the generator runs; with autograd on, T5 differs from itself by ~1e-6.
    with torch.inference_mode():
        theirs, _, theirs_pooled, _ = pipe.encode_prompt(
            prompt, None, None, device=CPU, do_classifier_free_guidance=False, max_sequence_length=77
        )
    assert context.shape == theirs.shape == (1, 2 * CHUNK, 96)
    assert torch.equal(context, theirs)
    assert torch.equal(pooled, theirs_pooled)


# -- lengths --------------------------------------------------------------------------------------
def test_long_prompt_is_chunked_for_clip_and_kept_whole_for_t5(pipe: Any) -> None:
    clip_tokens = n_tokens(pipe.tokenizer, LONG)
    assert 150 < clip_tokens <= 225  # three chunks of up to 75 tokens
    t5_tokens = n_tokens(pipe.tokenizer_3, LONG)
    assert t5_tokens + 1 > 77

    context, pooled = encode(pipe, LONG)
    assert context.shape == (1, 3 * CHUNK + t5_tokens + 1, 96)

    # diffusers truncates CLIP to BOS + 75 tokens + EOS, which is exactly our first chunk; the
    # pooled vector comes from that chunk alone.
    with torch.inference_mode():
        theirs, _, theirs_pooled, _ = pipe.encode_prompt(
            LONG, None, None, device=CPU, do_classifier_free_guidance=False, max_sequence_length=77
        )
    assert torch.equal(context[:, :CHUNK], theirs[:, :CHUNK])
    assert torch.equal(pooled, theirs_pooled)
    # Later chunks are real encodings (BOS at their start), not copies of the first.
    assert not torch.equal(context[:, CHUNK : 2 * CHUNK], context[:, :CHUNK])


def test_t5_length_grows_with_the_prompt_and_min_length_pads(pipe: Any) -> None:
    short, _ = encode_prompt(pipe, "a cat", device=CPU, dtype=torch.float32, t5_min_length=100)
    assert short.shape[1] == CHUNK + 100
    t5_tokens = n_tokens(pipe.tokenizer_3, LONG)
    long, _ = encode_prompt(pipe, LONG, device=CPU, dtype=torch.float32, t5_min_length=100)
    assert long.shape[1] == 3 * CHUNK + max(100, t5_tokens + 1)


def test_a_short_weighted_segment_moves_whole_to_the_next_chunk(pipe: Any) -> None:
    # 73 plain tokens leave room for 2; "abcd" (4 tokens, under ComfyUI's 8-token word length)
    # is not split: chunk 1 stays the 73 tokens + EOS + padding and "abcd" opens chunk 2.
    head = "x" * 73
    assert n_tokens(pipe.tokenizer, head) == 73
    prompt = head + " (abcd:1.2)"
    context, _ = encode(pipe, prompt)
    alone, _ = encode(pipe, head)
    assert context.shape[1] == 2 * CHUNK + t5_length(pipe, prompt)
    assert torch.equal(context[:, :CHUNK], alone[:, :CHUNK])

    # A long weighted segment is split at the boundary instead, so chunk 1 changes.
    prompt = head + " (abcdefghij:1.2)"
    split, _ = encode(pipe, prompt)
    assert split.shape[1] == 2 * CHUNK + t5_length(pipe, prompt)
    assert (split[:, :CHUNK] - alone[:, :CHUNK]).abs().max() > 1e-3


# -- weights --------------------------------------------------------------------------------------
def test_an_explicit_weight_of_one_is_the_plain_prompt(pipe: Any) -> None:
    plain, plain_pooled = encode(pipe, "cat")
    weighted, weighted_pooled = encode(pipe, "(cat:1.0)")
    assert torch.equal(weighted, plain)
    assert torch.equal(weighted_pooled, plain_pooled)


def test_weighted_tokens_move_away_from_the_empty_prompt(pipe: Any) -> None:
    w = 1.5
    plain, plain_pooled = encode(pipe, "a cat on a mat")
    weighted, weighted_pooled = encode(pipe, f"a (cat:{w}) on a mat")
    empty, _ = encode(pipe, "")
    assert weighted.shape == plain.shape == empty.shape

    # Where "cat" sits: after BOS and "a " in each CLIP chunk, after "a " in the T5 part.
    rows = torch.zeros(plain.shape[1], dtype=torch.bool)
    clip_start = 1 + n_tokens(pipe.tokenizer, "a ")
    rows[clip_start : clip_start + n_tokens(pipe.tokenizer, "cat")] = True
    t5_start = CHUNK + n_tokens(pipe.tokenizer_3, "a ")
    rows[t5_start : t5_start + n_tokens(pipe.tokenizer_3, "cat")] = True
    assert n_tokens(pipe.tokenizer, "cat") == n_tokens(pipe.tokenizer_2, "cat")

    expected = torch.where(rows[None, :, None], empty + w * (plain - empty), plain)
    assert torch.equal(weighted, expected)
    assert (weighted[0, rows] - plain[0, rows]).abs().max() > 1e-3
    assert torch.equal(weighted[0, ~rows], plain[0, ~rows])
    assert torch.equal(weighted_pooled, plain_pooled)  # pooled is never weighted


@pytest.mark.parametrize("huge", ["1e39", "1e6", "-1e39"])
def test_a_huge_weight_is_clamped_to_the_bound_not_turned_into_nans(pipe: Any, huge: str) -> None:
    bound = MAX_WEIGHT if not huge.startswith("-") else -MAX_WEIGHT
    clamped, _ = encode(pipe, f"a (cat:{huge}) on a mat")
    at_bound, _ = encode(pipe, f"a (cat:{bound:g}) on a mat")
    assert torch.isfinite(clamped).all()
    assert torch.equal(clamped, at_bound)


def test_count_tokens_counts_what_encoding_feeds_clip(pipe: Any) -> None:
    # Character-level tiny tokenizer: parentheses and the weight are syntax, not tokens.
    assert count_tokens(pipe.tokenizer, "a (cat:1.5) on a mat") == n_tokens(pipe.tokenizer, "a cat on a mat")
    assert count_tokens(pipe.tokenizer, LONG) == n_tokens(pipe.tokenizer, LONG) > 75
    assert count_tokens(pipe.tokenizer, "") == 0


# -- the checkpoint without T5 ---------------------------------------------------------------------
def test_without_t5_the_context_is_clip_only(pipe: Any, pipe_without_t5: Any) -> None:
    assert pipe_without_t5.text_encoder_3 is None
    for prompt, chunks in [("a cat on a mat", 1), (LONG, 3), ("", 1)]:
        context, pooled = encode(pipe_without_t5, prompt)
        assert context.shape == (1, chunks * CHUNK, 96)
        with_t5, with_t5_pooled = encode(pipe, prompt)
        assert torch.equal(context, with_t5[:, : chunks * CHUNK])
        assert torch.equal(pooled, with_t5_pooled)


def test_dtype_and_shapes_follow_the_request(pipe: Any) -> None:
    context, pooled = encode_prompt(pipe, "(a cat:1.3)", device=CPU, dtype=torch.bfloat16)
    assert context.dtype == pooled.dtype == torch.bfloat16
    assert pooled.shape == (1, 32 + 48)
    assert math.isfinite(float(context.float().abs().max()))
