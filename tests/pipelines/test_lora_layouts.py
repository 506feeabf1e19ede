"""SD3 LoRAs in kohya's, ComfyUI's and OneTrainer's layouts: rewritten into diffusers' and fused.

The oracle is diffusers' own single-file converter for the full weights: a LoRA on Stability's
module names adds ΔW = (alpha/r)·up·down to each reference weight, so a reference checkpoint made
of those ΔW, converted by diffusers, is what the fused model must have added to each of its weights
(the q/k/v split and the adaLN (shift, scale) swaps included)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from pipelines.lora import LoraError, LoraSpec, fuse_loras
from pipelines.lora_layouts import LoraLayoutError, is_diffusers_layout, to_diffusers_layout

pytest.importorskip("peft", reason="the test extra installs peft")

RANK = 3
ALPHA = 6.0


def _reference_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Stability's MMDiT linear (and patch-conv) weights, from the model card's architecture."""
    d = config.num_attention_heads * config.attention_head_dim
    p, c_in, c_out = config.patch_size, config.in_channels, config.out_channels
    shapes: dict[str, tuple[int, ...]] = {
        "x_embedder.proj": (d, c_in, p, p),
        "context_embedder": (config.caption_projection_dim, config.joint_attention_dim),
        "t_embedder.mlp.0": (d, 256),
        "t_embedder.mlp.2": (d, d),
        "y_embedder.mlp.0": (d, config.pooled_projection_dim),
        "y_embedder.mlp.2": (d, d),
        "final_layer.linear": (p * p * c_out, d),
        "final_layer.adaLN_modulation.1": (2 * d, d),
    }
    last = config.num_layers - 1
    for i in range(config.num_layers):
        x, c = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
        dual = i in config.dual_attention_layers
        shapes[f"{x}.adaLN_modulation.1"] = (9 * d if dual else 6 * d, d)  # MMDiT-X: 3 more for attn2
        shapes[f"{c}.adaLN_modulation.1"] = (2 * d if i == last else 6 * d, d)  # the last is pre-only
        for block in (x, c):
            shapes[f"{block}.attn.qkv"] = (3 * d, d)
            if block == c and i == last:  # pre-only: no output projection, no MLP
                continue
            shapes[f"{block}.attn.proj"] = (d, d)
            shapes[f"{block}.mlp.fc1"] = (4 * d, d)
            shapes[f"{block}.mlp.fc2"] = (d, 4 * d)
        if dual:
            shapes[f"{x}.attn2.qkv"] = (3 * d, d)
            shapes[f"{x}.attn2.proj"] = (d, d)
    return shapes


def _reference_lora(config: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random LoRA on every reference module, as kohya writes it (down, up, alpha)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in _reference_shapes(config).items():
        inner = shape[1:]
        down = torch.randn(RANK, *inner, generator=gen) * 0.2
        up = torch.randn(shape[0], RANK, *([1] * (len(shape) - 2)), generator=gen) * 0.2
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = down, up
        state[f"{name}.alpha"] = torch.tensor(ALPHA)
    return state


def _kohya(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same LoRA under kohya's names: 'lora_unet_' and the module path with underscores."""
    renamed = {}
    for key, value in lora.items():
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            if key.endswith(suffix):
                renamed["lora_unet_" + key.removesuffix(suffix).replace(".", "_") + suffix] = value
    return renamed


def _expected_deltas(transformer: Any, lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What diffusers' own converter makes of a reference checkpoint holding each module's ΔW."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    checkpoint: dict[str, torch.Tensor] = {"pos_embed": transformer.pos_embed.pos_embed.clone()}
    for key in lora:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.removesuffix(".lora_down.weight")
        down, up = lora[key], lora[f"{name}.lora_up.weight"]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * (ALPHA / RANK)
        checkpoint[f"{name}.weight"] = delta
        checkpoint[f"{name}.bias"] = torch.zeros(up.shape[0])
    converted = convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    own = transformer.state_dict()
    # The test's reference table must describe this model exactly, or the oracle proves nothing.
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(own[k].shape) for k in converted}
    return {k: v for k, v in converted.items() if k.endswith(".weight") and v.ndim >= 2}


def _assert_deltas(converted: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Each converted pair's B·A equals diffusers' ΔW for that weight, and every ΔW is covered."""
    got = {}
    for key, down in converted.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            up = converted[f"{module}.lora_B.weight"]
            got[module.removeprefix("transformer.") + ".weight"] = (up.flatten(1) @ down.flatten(1)).reshape(
                up.shape[0], *down.shape[1:]
            )
    assert set(got) == set(expected)
    for key, delta in expected.items():
        torch.testing.assert_close(got[key], delta, rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def pipe(tiny_dir: Path) -> Any:
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(tiny_dir, dtype=torch.float32)


def test_a_kohya_lora_on_reference_names_becomes_diffusers_own_deltas(pipe: Any) -> None:
    lora = _reference_lora(pipe.transformer.config)
    kohya = _kohya(lora)
    assert not is_diffusers_layout(kohya)
    _assert_deltas(to_diffusers_layout(kohya, pipe), _expected_deltas(pipe.transformer, lora))


def test_comfyui_names_with_lora_a_b_and_no_alpha_convert_alike(pipe: Any) -> None:
    lora = _reference_lora(pipe.transformer.config, seed=1)
    comfy = {}
    for key, value in lora.items():
        if key.endswith(".alpha"):
            continue
        if key.endswith(".lora_up.weight"):
            value = value * (ALPHA / RANK)  # no alpha in the file: the scale is in up already
        key = key.replace("lora_down", "lora_A").replace("lora_up", "lora_B")
        comfy[f"diffusion_model.{key}"] = value
    _assert_deltas(to_diffusers_layout(comfy, pipe), _expected_deltas(pipe.transformer, lora))


def test_sd35_mediums_second_attention_converts_too() -> None:
    from diffusers import SD3Transformer2DModel

    transformer: Any = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        caption_projection_dim=32,
        pooled_projection_dim=20,
        out_channels=16,
        pos_embed_max_size=32,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    lora = _reference_lora(transformer.config, seed=2)
    comfy = {f"model.diffusion_model.{k}": v for k, v in lora.items()}  # a whole-checkpoint prefix
    converted = to_diffusers_layout(comfy, SimpleNamespace(transformer=transformer))
    assert "transformer.transformer_blocks.0.attn2.to_v.lora_B.weight" in converted
    _assert_deltas(converted, _expected_deltas(transformer, lora))


def test_onetrainer_and_peft_names_are_diffusers_modules_with_another_spelling(pipe: Any) -> None:
    gen = torch.Generator().manual_seed(3)
    down, up = torch.randn(RANK, 32, generator=gen), torch.randn(32, RANK, generator=gen)
    for key in (
        "lora_transformer_transformer_blocks_1_attn_to_q",
        "base_model.model.transformer_blocks.1.attn.to_q",
    ):
        converted = to_diffusers_layout({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}, pipe)
        assert set(converted) == {
            "transformer.transformer_blocks.1.attn.to_q.lora_A.weight",
            "transformer.transformer_blocks.1.attn.to_q.lora_B.weight",
        }
        torch.testing.assert_close(converted["transformer.transformer_blocks.1.attn.to_q.lora_B.weight"], up)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"lora_unet_no_such_block.lora_down.weight": torch.zeros(RANK, 4)}, "lacks its down or up"),
        (
            {
                "lora_unet_no_such_block.lora_down.weight": torch.zeros(1, 4),
                "lora_unet_no_such_block.lora_up.weight": torch.zeros(4, 1),
            },
            "not a layer of this SD3 model",
        ),
        (
            {
                "lora_te3_encoder_block_0.lora_down.weight": torch.zeros(1, 4),
                "lora_te3_encoder_block_0.lora_up.weight": torch.zeros(4, 1),
            },
            "no T5 LoRA",
        ),
        ({"lora_unet_context_embedder.hada_w1_a": torch.zeros(1, 4)}, "LoHa/LoKr"),
    ],
)
def test_what_cannot_be_placed_is_refused_by_name(
    pipe: Any, state: dict[str, torch.Tensor], message: str
) -> None:
    with pytest.raises(LoraLayoutError, match=message):
        to_diffusers_layout(state, pipe)


def test_the_same_layer_named_twice_is_refused(pipe: Any) -> None:
    down, up = torch.zeros(1, 32), torch.zeros(32, 1)
    state = {}
    for key in (
        "lora_unet_joint_blocks_0_x_block_attn_proj",
        "diffusion_model.joint_blocks.0.x_block.attn.proj",
    ):
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
    with pytest.raises(LoraLayoutError, match="already holds"):
        to_diffusers_layout(state, pipe)


def test_a_kohya_file_is_fused_by_the_serving_code_transformer_and_clip(pipe: Any, tmp_path: Path) -> None:
    """End to end: a kohya file on disk, through fuse_loras at scale 0.5, moves each weight by half
    of diffusers' ΔW, the adaLN, embedder and patch-conv layers included, and the CLIP encoder too."""
    import copy

    fused = copy.deepcopy(pipe)
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    base_clip = pipe.text_encoder.text_model.encoder.layers[0].self_attn.q_proj.weight.clone()
    lora = _reference_lora(pipe.transformer.config, seed=4)
    state = _kohya(lora)
    gen = torch.Generator().manual_seed(5)
    width = base_clip.shape[0]
    clip_down, clip_up = torch.randn(RANK, width, generator=gen), torch.randn(width, RANK, generator=gen)
    state["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = clip_down
    state["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = clip_up
    path = tmp_path / "kohya.safetensors"
    save_file(state, path)

    assert fuse_loras(fused, [LoraSpec(str(path), 0.5)]) == [f"{path} × 0.5"]
    after = fused.transformer.state_dict()
    for key, delta in _expected_deltas(pipe.transformer, lora).items():
        torch.testing.assert_close(after[key] - base[key], 0.5 * delta, rtol=1e-4, atol=1e-5, msg=key)
    clip_after = fused.text_encoder.text_model.encoder.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(clip_after - base_clip, 0.5 * clip_up @ clip_down, rtol=1e-4, atol=1e-5)


def test_a_file_with_an_unplaceable_key_stops_the_start(pipe: Any, tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    save_file(
        {
            "lora_unet_nowhere.lora_down.weight": torch.zeros(1, 4),
            "lora_unet_nowhere.lora_up.weight": torch.zeros(4, 1),
        },
        path,
    )
    with pytest.raises(LoraError, match="nowhere.*not a layer"):
        fuse_loras(pipe, [LoraSpec(str(path))])
