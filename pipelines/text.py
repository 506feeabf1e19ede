"""SD3 text conditioning as ComfyUI computes it, on diffusers/transformers components (docs/sampling.md §8).

Why this exists: diffusers' `encode_prompt` truncates CLIP at 77 tokens and T5 at `max_sequence_length`
(256 by default), appends zero T5 tokens when T5 is absent, and reads "(word:1.2)" as literal text.
The hosted API's parameters are ComfyUI's, and ComfyUI

- parses prompt weights: `(text:1.3)` sets 1.3, `(text)` multiplies by 1.1, `\\(` is a literal "(";
- splits a CLIP prompt into 77-token chunks (BOS + up to 75 tokens + EOS + padding), concatenates
  them along the sequence and takes the pooled vector from the first chunk;
- keeps every T5 token (tokens + EOS, padded to at least 77, no attention mask);
- weights a token as z_empty + w·(z − z_empty), z_empty being the empty prompt's encoding;
- omits the T5 part altogether when the checkpoint has no T5.

For an unweighted prompt of at most 75 CLIP and 76 T5 tokens the result is exactly diffusers'
`encode_prompt(..., max_sequence_length=77)`; the tests pin that.

Tokenizers are not thread-safe (diffusers issues #3672/#7851): call `encode_prompt` under the
generator's tokenizer lock.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

CLIP_CHUNK = 77  # CLIP's position table: every chunk is exactly this long
CLIP_CONTENT = CLIP_CHUNK - 2  # room left by BOS and EOS
# ComfyUI moves a weighted segment shorter than this whole to the next chunk rather than splitting
# it across the chunk boundary; longer segments (and any unweighted long prompt) are split.
MAX_WORD_LENGTH = 8
EMPHASIS = 1.1  # "(text)" without an explicit weight
# Weights beyond this make no image, only overflow: (a:1e39) is inf in float32, large finite weights
# overflow fp16, and the sampler then returns NaNs. ComfyUI takes any float; we take
# ±10 (nested "(((…)))" multiplies 1.1 per level: 24 levels stay below it). The server refuses a
# prompt beyond it (422); the pipeline itself clamps, so that no caller gets NaNs from it.
MAX_WEIGHT = 10.0

Segments = list[tuple[str, float]]
Tokens = list[tuple[int, float]]  # (token id, weight)


# -- the prompt syntax ----------------------------------------------------------------------------
_Char = tuple[str, bool]  # (character, structural): an escaped "\(" is a literal "(", not structure


def parse_weights(text: str) -> Segments:
    """Split a prompt into (text, weight) segments, ComfyUI's way; never raises on user text.

    `(a:1.5)` gives ("a", 1.5); `(a)` ("a", 1.1); `((a))` ("a", 1.21) — nesting multiplies, an
    explicit weight replaces; `\\(x\\)` is the literal "(x)"; an unbalanced parenthesis stays text.
    """
    out: Segments = []
    # An explicit stack rather than recursion, so that deeply nested user text cannot overflow.
    # Items are either finished segments (str) or character runs still to parse (list); pushing a
    # level's pieces in reverse keeps the output in text order.
    stack: list[tuple[str | list[_Char], float]] = [(_scan(text), 1.0)]
    while stack:
        item, weight = stack.pop()
        if isinstance(item, str):
            out.append((item, weight))
            continue
        pieces: list[tuple[str | list[_Char], float]] = []
        for group in _split_top_level(item):
            if len(group) >= 2 and group[0] == ("(", True) and group[-1] == (")", True):
                inner, inner_weight = _group_weight(group[1:-1], weight)
                pieces.append((inner, inner_weight))
            else:
                pieces.append(("".join(ch for ch, _ in group), weight))
        stack.extend(reversed(pieces))
    return out


def _scan(text: str) -> list[_Char]:
    chars: list[_Char] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in "()":
            chars.append((text[i + 1], False))
            i += 2
        else:
            chars.append((ch, ch in "()"))
            i += 1
    return chars


def _split_top_level(chars: list[_Char]) -> list[list[_Char]]:
    """Runs of text and top-level "( … )" groups, in order.

    A group opens at a structural "(" at depth 0 and closes at the ")" that brings the depth back
    to 0. As in ComfyUI, a stray ")" drives the depth below 0, after which the rest is plain text.
    """
    groups: list[list[_Char]] = []
    current: list[_Char] = []
    depth = 0
    for item in chars:
        ch, structural = item
        if structural and ch == "(":
            if depth == 0 and current:
                groups.append(current)
                current = []
            current.append(item)
            depth += 1
        elif structural and ch == ")":
            depth -= 1
            current.append(item)
            if depth == 0:
                groups.append(current)
                current = []
        else:
            current.append(item)
    if current:
        groups.append(current)
    return groups


def _group_weight(inner: list[_Char], outer: float) -> tuple[list[_Char], float]:
    """The inside of a "( … )" group and its weight: ":w" after the last colon, else outer × 1.1."""
    colon = max((i for i, (ch, _) in enumerate(inner) if ch == ":"), default=-1)
    if colon > 0:  # a colon at position 0 is text, as in ComfyUI
        try:
            explicit = float("".join(ch for ch, _ in inner[colon + 1 :]))
        except ValueError:
            explicit = math.nan
        # ComfyUI would also accept "nan"/"inf"; they can only poison the image, so they read as text.
        if math.isfinite(explicit):
            return inner[:colon], explicit
    return inner, outer * EMPHASIS


def weight_out_of_bounds(segments: Segments) -> float | None:
    """The first weight beyond ±MAX_WEIGHT among `segments`, or None when every weight is usable."""
    return next((weight for _, weight in segments if abs(weight) > MAX_WEIGHT), None)


# -- tokens ---------------------------------------------------------------------------------------
def count_tokens(tokenizer: Any, text: str) -> int:
    """The content tokens `tokenizer` makes of a prompt, as encoding splits it (without BOS/EOS/padding)."""
    return sum(len(group) for group in _tokenize(tokenizer, parse_weights(text)))


def _tokenize(tokenizer: Any, segments: Segments) -> list[Tokens]:
    """One token group per segment, each token carrying its segment's weight.

    Segments are tokenized separately (as ComfyUI does), so a weight never leaks across a boundary.
    """
    groups: list[Tokens] = []
    for text, weight in segments:
        # verbose=False: a long prompt is not an error here; we chunk instead of truncating.
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if ids:
            bounded = min(max(weight, -MAX_WEIGHT), MAX_WEIGHT)
            groups.append([(int(token), bounded) for token in ids])
    return groups


def _clip_chunks(groups: list[Tokens]) -> list[Tokens]:
    """The content (without BOS/EOS) of each CLIP chunk, at most 75 tokens; at least one chunk."""
    chunks: list[Tokens] = [[]]
    for group in groups:
        rest = group
        while rest:
            room = CLIP_CONTENT - len(chunks[-1])
            if len(rest) <= room:
                chunks[-1].extend(rest)
                break
            if len(rest) >= MAX_WORD_LENGTH:
                chunks[-1].extend(rest[:room])
                rest = rest[room:]
            chunks.append([])
    return chunks


def _rows(
    contents: list[Tokens], *, length: int, bos: int | None, eos: int, pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [n, length] and weights [n, length]; BOS, EOS and padding have weight 1."""
    ids, weights = [], []
    for content in contents:
        head = [] if bos is None else [(bos, 1.0)]
        row = head + content + [(eos, 1.0)]
        row += [(pad, 1.0)] * (length - len(row))
        ids.append([token for token, _ in row])
        weights.append([weight for _, weight in row])
    return torch.tensor(ids, dtype=torch.long), torch.tensor(weights, dtype=torch.float32)


def _apply_weights(z: torch.Tensor, z_empty: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """z_empty + w·(z − z_empty) at the positions whose weight is not 1; the rest is left untouched."""
    w = weights.to(device=z.device, dtype=z.dtype).unsqueeze(-1)
    return torch.where(w != 1.0, (z - z_empty) * w + z_empty, z)


# -- encoders -------------------------------------------------------------------------------------
def _encode_clip(
    encoder: Any, tokenizer: Any, segments: Segments, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP penultimate hidden states of all chunks, concatenated [1, 77·n, d], and the pooled [1, p]."""
    contents = _clip_chunks(_tokenize(tokenizer, segments))
    # Each tokenizer's own pad id: SD3's CLIP-L pads with EOS, CLIP-G with "!" = 0 (docs/sampling.md §8).
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, weights = _rows(contents, length=CLIP_CHUNK, bos=bos, eos=eos, pad=pad)
    outputs = [encoder(row.to(device), output_hidden_states=True) for row in _one_by_one(ids)]
    # Penultimate layer without the final LayerNorm, as both ComfyUI and diffusers take it. Float32
    # for the weighting arithmetic, as ComfyUI; exact for fp32/fp16/bf16 encoders when unweighted.
    z = torch.cat([out.hidden_states[-2] for out in outputs]).float()
    # Pooled from the first chunk only, never weighted. SD3's CLIP-L projection is the identity
    # (asserted at load), so `text_embeds` is ComfyUI's un-projected pooled vector for CLIP-L too.
    pooled = outputs[0].text_embeds.float()
    if bool((weights != 1.0).any()):
        empty_ids, _ = _rows([[]], length=CLIP_CHUNK, bos=bos, eos=eos, pad=pad)
        z_empty = encoder(empty_ids.to(device), output_hidden_states=True).hidden_states[-2].float()
        z = _apply_weights(z, z_empty, weights)
    return z.reshape(1, len(contents) * CLIP_CHUNK, z.shape[-1]), pooled


def _one_by_one(ids: torch.Tensor) -> list[torch.Tensor]:
    """Rows as batches of one. Batched forwards differ in the last bits from single ones; encoding
    each chunk alone keeps a chunk's encoding independent of its neighbours (bitwise diffusers
    parity, stable cache keys) for the price of a few 77-token forwards, small next to sampling."""
    return list(ids.split(1))


def _encode_t5(
    encoder: Any, tokenizer: Any, segments: Segments, device: torch.device, min_length: int
) -> torch.Tensor:
    """T5 last hidden state [1, max(min_length, tokens + 1), d]: never truncated, no attention mask."""
    content = [token for group in _tokenize(tokenizer, segments) for token in group]
    length = max(min_length, len(content) + 1)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, weights = _rows([content], length=length, bos=None, eos=eos, pad=pad)
    z = encoder(input_ids=ids.to(device)).last_hidden_state.float()
    if bool((weights != 1.0).any()):
        # z_empty is the empty prompt padded to the same length, so positions line up; encoded on
        # its own, for the reason given at `_one_by_one`.
        empty_ids, _ = _rows([[]], length=length, bos=None, eos=eos, pad=pad)
        z_empty = encoder(input_ids=empty_ids.to(device)).last_hidden_state.float()
        z = _apply_weights(z, z_empty, weights)
    return z


@torch.inference_mode()
def encode_prompt(
    pipe: Any,
    text: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    t5_min_length: int = 77,
    t5_device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's (context [1, L, D], pooled [1, P]) for one prompt, as ComfyUI encodes it.

    `pipe` is a diffusers `StableDiffusion3Pipeline` (its tokenizers, text encoders and the
    transformer's config are used). L = 77 · CLIP chunks + T5 length (≥ t5_min_length), or
    77 · CLIP chunks without T5, so two prompts may give different L. `t5_device`: where T5 runs
    when the memory plan keeps it off the accelerator (its output joins the rest on `device`).
    """
    segments = parse_weights(text)
    l_hidden, l_pooled = _encode_clip(pipe.text_encoder, pipe.tokenizer, segments, device)
    g_hidden, g_pooled = _encode_clip(pipe.text_encoder_2, pipe.tokenizer_2, segments, device)
    # SD3's two CLIP tokenizers share a vocabulary, so their chunk counts agree; should another pair
    # ever disagree, keep the common prefix rather than fail on a user's prompt.
    n = min(l_hidden.shape[1], g_hidden.shape[1])
    clip = torch.cat([l_hidden[:, :n], g_hidden[:, :n]], dim=-1)

    if pipe.text_encoder_3 is None:
        # No T5 (sd3_medium_incl_clips): ComfyUI has no T5 tokens at all, not zero ones.
        width = int(pipe.transformer.config.joint_attention_dim)
        context = F.pad(clip, (0, width - clip.shape[-1]))
    else:
        t5 = _encode_t5(pipe.text_encoder_3, pipe.tokenizer_3, segments, t5_device or device, t5_min_length)
        t5 = t5.to(device)
        context = torch.cat([F.pad(clip, (0, t5.shape[-1] - clip.shape[-1])), t5], dim=1)
    pooled = torch.cat([l_pooled, g_pooled], dim=-1)
    return context.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype)
