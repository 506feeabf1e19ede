"""The tiny random-weight SD3: the real diffusers/transformers classes at toy widths.

It exists so that the whole server can run (and be tested) with no network, no GPU and no
weights: `sd3-server serve --model tiny`. Everything about its *shape* is realistic — a
16-channel latent, an 8x VAE with SD3's scaling/shift factors, 2x2 patching, the SD3 position
table, CLIP-L + CLIP-G + T5 with their own tokenizers and SD3's pad-token conventions — so the
code paths are the ones real weights take. Only the widths and depths are tiny, and the weights
are random from a fixed seed, so its images are noise with structure, identical on every machine.

The model is written once as an ordinary diffusers folder and then loaded by
`pipelines.loading`, exactly like a downloaded model.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

# Bump when anything below changes, so cached folders are rebuilt rather than silently reused.
RECIPE_VERSION = "1"
_MARKER = "sd3-server-tiny.json"
_SEED = 1234

# Widths are deliberately all different, so that a mix-up between encoders fails loudly.
CLIP_L_WIDTH = 32  # SD3's CLIP-L projection is the identity, so projection_dim == hidden size
CLIP_G_WIDTH = 48
T5_WIDTH = 96  # = joint_attention_dim, and >= CLIP_L_WIDTH + CLIP_G_WIDTH as in SD3 (768+1280 <= 4096)
MAX_CLIP_TOKENS = 77


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's byte-level alphabet: printable bytes map to themselves, the rest to code points >= 256.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _bpe(parts: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """`parts` merged as BPE merges them: the best-ranked adjacent pair first, until none applies."""
    while len(parts) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(itertools.pairwise(parts)))
        if rank == len(ranks):
            break
        parts = [*parts[:i], parts[i] + parts[i + 1], *parts[i + 2 :]]
    return parts


def _word_merges(words: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """BPE merges that make each of `words` one token, and the tokens they make.

    Each word's merges join, left to right, what the earlier words' merges already make of it
    ("ri" from "right" inside "triangle"); a later merge ranks below every earlier one, so it
    never changes how an earlier word is merged.
    """
    ranks: dict[tuple[str, str], int] = {}
    made: list[str] = []
    for word in dict.fromkeys(words):
        parts = _bpe([*word[:-1], word[-1] + "</w>"], ranks)
        while len(parts) > 1:
            ranks.setdefault((parts[0], parts[1]), len(ranks))
            parts = [parts[0] + parts[1], *parts[2:]]
            made.append(parts[0])
    return list(ranks), list(dict.fromkeys(made))


def clip_tokenizer(pad_token: str, words: Sequence[str] = ()):  # type: ignore[no-untyped-def]
    """A CLIP BPE tokenizer over the byte alphabet: one token per character, and one per word of `words`.

    The order of the vocabulary follows CLIP's (alphabet, alphabet + "</w>", merged tokens,
    specials), so "!" is id 0 — the pad token of SD3's CLIP-G tokenizer — and the special tokens
    come last. `words` get merges as a BPE trained on a corpus of them would have learnt; any other
    text still tokenizes, a character at a time.
    """
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    merges, made = _word_merges(words)
    singles = alphabet + [c + "</w>" for c in alphabet]
    tokens = singles + [t for t in made if t not in singles] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    # The annotation says strings; the tokenizers backend takes the pairs themselves.
    tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token)  # type: ignore[arg-type]
    tok.model_max_length = MAX_CLIP_TOKENS
    return tok


def t5_tokenizer(words: Sequence[str] = ()):  # type: ignore[no-untyped-def]
    """A SentencePiece-style unigram tokenizer with T5's special ids (pad 0, eos 1, unk 2).

    Characters, plus one piece per word of `words` (scored above any spelling of it in characters).
    """
    from transformers import T5Tokenizer

    chars = [chr(c) for c in range(ord(" ") + 1, ord("~") + 1)]
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    pieces += [("▁" + w, -1.0) for w in dict.fromkeys(words)]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    tok.model_max_length = 512
    return tok


def build_tiny_pipeline(words: Sequence[str] = (), residual_scale: float = 1.0):  # type: ignore[no-untyped-def]
    """Build the tiny SD3 pipeline in memory (random weights from a fixed seed, float32).

    The defaults are the tiny model. The toy (`pipelines.toy.train`) may ask for text encoders nearer
    a trained one's habits: `words` each become one token in all three tokenizers, and
    `residual_scale` multiplies the output projection of every attention and MLP branch of the
    three encoders (as GPT-2 scales them at initialisation), so that below 1 less of the rest of the
    sentence is mixed into each word's encoding (docs/toy.md §18 measures both).
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tokenizer = clip_tokenizer(pad_token="<|endoftext|>", words=words)  # SD3's CLIP-L pads with EOS
    tokenizer_2 = clip_tokenizer(pad_token="!", words=words)  # SD3's CLIP-G pads with "!" = id 0
    tokenizer_3 = t5_tokenizer(words)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def clip(width: int, projection: int, seed: int) -> CLIPTextModelWithProjection:
        torch.manual_seed(seed)
        config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=MAX_CLIP_TOKENS,
            projection_dim=projection,
            hidden_act="gelu",
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )
        return CLIPTextModelWithProjection(config).eval()

    text_encoder = clip(CLIP_L_WIDTH, CLIP_L_WIDTH, _SEED)
    with torch.no_grad():
        # As in SD3 (docs/sampling.md §8): the pooled CLIP-L output is the un-projected hidden state.
        text_encoder.text_projection.weight.copy_(torch.eye(CLIP_L_WIDTH))
    text_encoder_2 = clip(CLIP_G_WIDTH, CLIP_G_WIDTH, _SEED + 1)

    torch.manual_seed(_SEED + 2)
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_3),
            d_model=T5_WIDTH,
            d_kv=16,
            d_ff=2 * T5_WIDTH,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            # A PretrainedConfig field T5Config's typed signature leaves out; accepted at run time.
            decoder_start_token_id=0,  # type: ignore[call-arg]
        )
    ).eval()

    if residual_scale != 1.0:
        with torch.no_grad():
            for clip_model in (text_encoder, text_encoder_2):
                for layer in clip_model.text_model.encoder.layers:
                    layer.self_attn.out_proj.weight.mul_(residual_scale)
                    layer.mlp.fc2.weight.mul_(residual_scale)
            for block in text_encoder_3.encoder.block:
                block.layer[0].SelfAttention.o.weight.mul_(residual_scale)
                block.layer[1].DenseReluDense.wo.weight.mul_(residual_scale)

    torch.manual_seed(_SEED + 3)
    transformer = SD3Transformer2DModel(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=32,
        pooled_projection_dim=CLIP_L_WIDTH + CLIP_G_WIDTH,
        out_channels=16,
        pos_embed_max_size=192,  # SD3 Medium's table: up to 192 patches a side = 3072 px
    ).eval()  # type: ignore[attr-defined]  # diffusers' typed models lack nn.Module's methods

    torch.manual_seed(_SEED + 4)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 8, 8, 8),  # four blocks = three 2x steps = SD3's 8x
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=1024,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()  # type: ignore[attr-defined]  # as above

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def ensure_tiny_model(directory: Path) -> Path:
    """Return a diffusers folder holding the tiny model, writing it first if it is not there.

    Written to a temporary sibling and renamed into place, so that two processes starting at
    once never see (or leave) a half-written folder.
    """
    directory = Path(directory)
    marker = directory / _MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("recipe") == RECIPE_VERSION:
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-sd3-", dir=directory.parent))
    try:
        build_tiny_pipeline().save_pretrained(staging, safe_serialization=True)
        (staging / _MARKER).write_text(json.dumps({"recipe": RECIPE_VERSION, "seed": _SEED}))
        if directory.exists():
            shutil.rmtree(directory, ignore_errors=True)
        try:
            os.replace(staging, directory)
        except OSError:
            # Another process won the race with the same recipe: keep its folder.
            if not (marker.is_file() and json.loads(marker.read_text()).get("recipe") == RECIPE_VERSION):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory
