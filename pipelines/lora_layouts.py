"""SD3 LoRA files in the layouts other trainers write, rewritten into the one diffusers loads.

diffusers 0.42.1 reads SD3 LoRAs only in its own layout (`transformer.<module>.lora_A.weight`). The
files people share for SD3 are mostly in others, all of which ComfyUI reads:

- kohya sd-scripts and ComfyUI's own LoRA saver name the modules of Stability's reference MMDiT
  (`joint_blocks.3.x_block.attn.qkv`), as `lora_unet_joint_blocks_3_x_block_attn_qkv` or as
  `diffusion_model.joint_blocks.3.x_block.attn.qkv`, with `lora_down`/`lora_up` and an `alpha`;
- OneTrainer names diffusers' modules with underscores (`lora_transformer_transformer_blocks_3_attn_to_q`);
- a bare peft dump prefixes them with `base_model.model.`;
- kohya's text-encoder LoRAs are `lora_te1_…` (CLIP-L) and `lora_te2_…` (CLIP-G).

Two things are more than renaming. The reference model computes q, k and v with one fused linear
layer where diffusers has three: a LoRA on `qkv` (down [r, d], up [3d, r]) becomes three LoRAs that
share `down` and each take a third of `up`'s rows. And two adaLN projections (the final layer's and
the last block's context modulation) emit (shift, scale) where diffusers' emit (scale, shift): their
`up` rows swap halves, as the weights' own conversion swaps them. `alpha / rank` is multiplied into
`up`, so the result needs no metadata and means what the trainer meant.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch


class LoraLayoutError(ValueError):
    """A key that cannot be placed in the model: one sentence naming it."""


_DOWN_UP = (("lora_down.weight", "lora_up.weight"), ("lora_A.weight", "lora_B.weight"))
_SAI_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_TEXT_ENCODERS = {"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}


@dataclass(frozen=True)
class _Target:
    module: str  # diffusers' module path, e.g. "transformer.transformer_blocks.3.attn.to_q"
    part: int = 0  # which of `parts` equal row slices of `up` it takes
    parts: int = 1
    swap_halves: bool = False  # (shift, scale) → (scale, shift)


def is_diffusers_layout(state: dict[str, torch.Tensor]) -> bool:
    """Whether diffusers' own SD3 loader reads `state` as it is."""
    return all(key.startswith(("transformer.", "text_encoder.", "text_encoder_2.")) for key in state)


def to_diffusers_layout(state: dict[str, torch.Tensor], pipe: Any) -> dict[str, torch.Tensor]:
    """`state` (any layout above) as diffusers' SD3 LoRA layout for `pipe`'s modules, alpha applied.

    Raises `LoraLayoutError` for a key this cannot place: a silently dropped layer would serve a model
    that is neither the base nor the LoRA's.
    """
    targets = _target_index(pipe)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, role = _split(key)
        pairs.setdefault(module, {})[role] = tensor
    converted: dict[str, torch.Tensor] = {}
    for module, found in pairs.items():
        if "down" not in found or "up" not in found:
            raise LoraLayoutError(f"LoRA module {module!r} lacks its down or up matrix")
        down, up = found["down"], found["up"]
        rank = down.shape[0]
        if "alpha" in found:
            up = up * (float(found["alpha"]) / rank)
        places = targets.get(module)
        if places is None:
            why = " (diffusers' SD3 loader reads no T5 LoRA)" if module.startswith("lora_te3_") else ""
            raise LoraLayoutError(f"LoRA module {module!r} is not a layer of this SD3 model{why}")
        for target in places:
            if f"{target.module}.lora_A.weight" in converted:
                raise LoraLayoutError(f"LoRA module {module!r} names a layer the file already holds")
            rows = up.shape[0] // target.parts
            part = up[target.part * rows : (target.part + 1) * rows]
            if target.swap_halves:
                shift, scale = part.chunk(2, dim=0)
                part = torch.cat([scale, shift])
            converted[f"{target.module}.lora_A.weight"] = down
            converted[f"{target.module}.lora_B.weight"] = part.contiguous()
    return converted


def _split(key: str) -> tuple[str, str]:
    """'<module>.lora_down.weight' → ('<module>', 'down'); also lora_A/lora_B and '.alpha'."""
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "alpha"
    for down, up in _DOWN_UP:
        if key.endswith("." + down):
            return key[: -len(down) - 1], "down"
        if key.endswith("." + up):
            return key[: -len(up) - 1], "up"
    raise LoraLayoutError(
        f"LoRA key {key!r} is neither a down/up matrix nor an alpha (LoHa/LoKr are not read)"
    )


def _target_index(pipe: Any) -> dict[str, list[_Target]]:
    """Every module name a LoRA file may use for `pipe`, in every layout, → where it goes."""
    index: dict[str, list[_Target]] = {}
    transformer = pipe.transformer
    linear = {
        name for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
    }
    for name in linear:
        place = [_Target(f"transformer.{name}")]
        index[f"transformer.{name}"] = place
        index[f"base_model.model.{name}"] = place
        index["lora_transformer_" + name.replace(".", "_")] = place
    for sai, places in _reference_names(transformer.config, linear):
        for prefix in _SAI_PREFIXES:
            index[prefix + sai] = places
        index["lora_unet_" + sai.replace(".", "_")] = places
    for prefix, component in _TEXT_ENCODERS.items():
        encoder = getattr(pipe, component, None)
        if encoder is None:
            continue
        for name, module in encoder.named_modules():
            if isinstance(module, torch.nn.Linear):
                place = [_Target(f"{component}.{name}")]
                index[prefix + name.replace(".", "_")] = place
                index[f"{component}.{name}"] = place
    return index


def _reference_names(config: Any, linear: set[str]) -> Iterable[tuple[str, list[_Target]]]:
    """Stability's MMDiT module names for this transformer, each with the diffusers modules it
    becomes (the mapping diffusers' single-file loader applies to the full weights)."""

    def one(name: str, *, swap: bool = False) -> list[_Target]:
        return [_Target(f"transformer.{name}", swap_halves=swap)]

    def three(*names: str) -> list[_Target]:
        return [_Target(f"transformer.{n}", part=i, parts=3) for i, n in enumerate(names)]

    yield "x_embedder.proj", one("pos_embed.proj")
    yield "context_embedder", one("context_embedder")
    for sai, ours in (("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")):
        yield f"{sai}.mlp.0", one(f"time_text_embed.{ours}.linear_1")
        yield f"{sai}.mlp.2", one(f"time_text_embed.{ours}.linear_2")
    yield "final_layer.linear", one("proj_out")
    yield "final_layer.adaLN_modulation.1", one("norm_out.linear", swap=True)
    last = config.num_layers - 1
    for i in range(config.num_layers):
        x, c, d = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block", f"transformer_blocks.{i}"
        yield f"{x}.attn.qkv", three(f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v")
        yield f"{x}.attn.proj", one(f"{d}.attn.to_out.0")
        yield f"{x}.mlp.fc1", one(f"{d}.ff.net.0.proj")
        yield f"{x}.mlp.fc2", one(f"{d}.ff.net.2")
        yield f"{x}.adaLN_modulation.1", one(f"{d}.norm1.linear")
        yield f"{c}.attn.qkv", three(f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj")
        # The last block's context side is "pre-only": its modulation emits (shift, scale) alone.
        yield f"{c}.adaLN_modulation.1", one(f"{d}.norm1_context.linear", swap=i == last)
        if i != last:
            yield f"{c}.attn.proj", one(f"{d}.attn.to_add_out")
            yield f"{c}.mlp.fc1", one(f"{d}.ff_context.net.0.proj")
            yield f"{c}.mlp.fc2", one(f"{d}.ff_context.net.2")
        if f"{d}.attn2.to_q" in linear:  # SD3.5 Medium's second self-attention (MMDiT-X)
            yield f"{x}.attn2.qkv", three(f"{d}.attn2.to_q", f"{d}.attn2.to_k", f"{d}.attn2.to_v")
            yield f"{x}.attn2.proj", one(f"{d}.attn2.to_out.0")
