"""The tiny model is a real SD3-shaped diffusers folder, built offline and deterministically."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.sd3 import SD3Generator
from pipelines.tiny import ensure_tiny_model
from server.app import Runtime
from server.config import Settings


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
