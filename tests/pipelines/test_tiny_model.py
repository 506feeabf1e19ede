"""The tiny model is a real SD3-shaped diffusers folder, built offline and deterministically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipelines.sd3 import SD3Generator
from pipelines.text import CLIP_CHUNK, encode_prompt
from pipelines.tiny import build_tiny_pipeline, ensure_tiny_model
from pipelines.toy import quality, world
from server.config import Settings
from server.runtime import Runtime

CPU = torch.device("cpu")


def test_tiny_model_is_a_diffusers_folder_with_sd3_components(runtime: Runtime, settings: Settings) -> None:
    folder = settings.tiny_model_dir
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    for part in (
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
        "scheduler",
    ):
        assert (folder / part).is_dir(), part
    assert list((folder / "transformer").glob("*.safetensors"))


def test_tiny_model_has_sd3_shapes_and_conventions(runtime: Runtime) -> None:
    assert isinstance(runtime.generator, SD3Generator)
    pipe = runtime.generator.pipe
    transformer, vae = pipe.transformer.config, pipe.vae.config
    assert transformer.patch_size == 2 and transformer.in_channels == 16 == transformer.out_channels
    assert transformer.pos_embed_max_size == 192
    assert vae.latent_channels == 16 and 2 ** (len(vae.block_out_channels) - 1) == 8
    assert (vae.scaling_factor, vae.shift_factor) == (1.5305, 0.0609)
    # The context is CLIP-L | CLIP-G padded to T5's width, and the pooled vector is L + G
    # (docs/sampling.md §8).
    clip_width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert clip_width <= pipe.text_encoder_3.config.d_model == transformer.joint_attention_dim
    assert transformer.pooled_projection_dim == (
        pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    )
    # Pad conventions of SD3's tokenizers: CLIP-L pads with EOS, CLIP-G with "!" (id 0), T5 pad 0 / eos 1.
    assert pipe.tokenizer.pad_token_id == pipe.tokenizer.eos_token_id
    assert pipe.tokenizer_2.pad_token_id == 0 and pipe.tokenizer_2.convert_ids_to_tokens(0) == "!"
    assert (pipe.tokenizer_3.pad_token_id, pipe.tokenizer_3.eos_token_id) == (0, 1)
    assert pipe.tokenizer.model_max_length == 77


def test_tiny_model_is_rebuilt_bit_identically(tmp_path: Path, settings: Settings) -> None:
    rebuilt = ensure_tiny_model(tmp_path / "tiny")
    for part in ("transformer", "vae", "text_encoder_3"):
        ours = next((settings.tiny_model_dir / part).glob("*.safetensors")).read_bytes()
        theirs = next((rebuilt / part).glob("*.safetensors")).read_bytes()
        assert ours == theirs, part


def _word_pipe(residual_scale: float = 1.0) -> Any:
    return build_tiny_pipeline(world.vocabulary(), residual_scale)


def test_the_toy_s_tokenizers_make_each_world_word_one_token_and_still_spell_anything_else(
    tmp_path: Path,
) -> None:
    from transformers import CLIPTokenizer, T5Tokenizer

    pipe = _word_pipe()
    pipe.save_pretrained(tmp_path)
    reloaded = (
        CLIPTokenizer.from_pretrained(tmp_path / "tokenizer"),
        CLIPTokenizer.from_pretrained(tmp_path / "tokenizer_2"),
        T5Tokenizer.from_pretrained(tmp_path / "tokenizer_3"),
    )
    words = world.vocabulary()
    # "triangle" holds "ri" of "right" and "an" of "an": merges built naively, word by word,
    # left to right, split it once saved (BPE applies the best-ranked merge first).
    assert {"triangle", "right", "an", "background", "orange"} <= set(words)
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3, *reloaded):
        for word in words:
            assert len(tokenizer.tokenize(word)) == 1, (word, tokenizer.tokenize(word))
        # Text outside the world is spelt as before, a character at a time.
        assert len(tokenizer.tokenize("a light blue cat")) >= len("lightcat")
    caption = "an orange triangle at the top right on a purple background"
    for ours, theirs in zip((pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3), reloaded, strict=True):
        assert len(ours.tokenize(caption)) == len(caption.split())
        assert ours(caption)["input_ids"] == theirs(caption)["input_ids"]
    # SD3's pad conventions hold with the bigger vocabulary: "!" is still CLIP-G's pad, id 0.
    assert pipe.tokenizer_2.pad_token_id == 0 and pipe.tokenizer.pad_token_id == pipe.tokenizer.eos_token_id


def test_the_default_tokenizers_are_the_tiny_model_s_one_token_a_character() -> None:
    pipe = build_tiny_pipeline()
    assert pipe.tokenizer.tokenize("red") == ["r", "e", "d</w>"]
    assert len(pipe.tokenizer_3.tokenize("red")) == 3


def _own_share(pipe: Any) -> float:
    """The mean own-position share of a shape-colour change over the probes quality.py reports on."""

    def context(text: str) -> torch.Tensor:
        return encode_prompt(pipe, text, device=CPU, dtype=torch.float32)[0][0]

    probes = quality.colour_word_probes()
    return sum(quality.own_position_share(context, c, other, CLIP_CHUNK) for c, other in probes) / len(probes)


def test_scaled_residual_branches_keep_a_word_at_its_own_position() -> None:
    # A weight moves only the word's own positions (pipelines.text), so where the word's encoding
    # lives decides how much a weight can do; random mixing spreads it over the whole sequence.
    full, half = _own_share(_word_pipe(1.0)), _own_share(_word_pipe(0.5))
    assert full < half and half > 0.95
    # Only the residual branches are scaled: the embeddings (what a word is) are the same numbers.
    a, b = _word_pipe(1.0), _word_pipe(0.5)
    assert torch.equal(a.text_encoder_3.shared.weight, b.text_encoder_3.shared.weight)
    assert torch.equal(
        b.text_encoder.text_model.encoder.layers[0].mlp.fc2.weight,
        0.5 * a.text_encoder.text_model.encoder.layers[0].mlp.fc2.weight,
    )
