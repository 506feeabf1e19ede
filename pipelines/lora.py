"""LoRA weights fused into the loaded model at start-up: `--lora PATH[:SCALE]`, repeatable.

A LoRA is read by diffusers' own SD3 loader (for the transformer and the CLIP encoders; files in
kohya's, ComfyUI's or OneTrainer's layout are rewritten into diffusers' first, by
`pipelines.lora_layouts`, since diffusers 0.42.1 converts none of them for SD3), scaled, merged
into the base weights and then unloaded, so
the model that serves is an ordinary one: no PEFT layers in the forward, nothing per step, and what
follows (fused QKV, the int8/fp8 transformer, offload, compilation) sees plain linear layers. One
LoRA set per server: a request cannot pick another (the images of a process stay reproducible).

The few-step mode is this with a step-distilled LoRA, e.g. ByteDance's Hyper-SD3 CFG LoRAs at the
scale and step count their model card gives: then `steps` asks for what the LoRA was distilled
for, not the base model's 28-40, which is why it is a server setting and not a request field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipelines import lora_layouts


class LoraError(ValueError):
    """A LoRA that cannot be read or does not fit the model: one sentence saying what to change."""


@dataclass(frozen=True)
class LoraSpec:
    source: str  # a .safetensors file, a folder holding one, or a Hub id
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """ "PATH" or "PATH:SCALE". Only a last `:` followed by a number is a scale, so Windows paths
        (C:\\loras\\x.safetensors) and Hub ids keep their colons."""
        source, sep, tail = text.rpartition(":")
        if sep and source:
            try:
                scale = float(tail)
            except ValueError:
                pass
            else:
                if not math.isfinite(scale):
                    raise LoraError(f"LoRA scale {tail!r} in {text!r} is not a finite number")
                return cls(source=source, scale=scale)
        if not text:
            raise LoraError("an empty --lora: give PATH or PATH:SCALE")
        return cls(source=text)


def fuse_loras(pipe: Any, loras: list[LoraSpec]) -> list[str]:
    """Merge every LoRA into `pipe`'s weights at its scale; return what was fused (for the log).

    Raises `LoraError` when a LoRA cannot be read or names layers the model does not have (diffusers
    warns and loads nothing for a LoRA of another architecture: that must not pass in silence).
    """
    if not loras:
        return []
    try:
        import peft  # noqa: F401  (diffusers' LoRA loading needs it)
    except ImportError as exc:
        raise LoraError("--lora needs the peft package: pip install -e '.[lora]'") from exc
    names = [f"lora_{i}" for i in range(len(loras))]
    for name, lora in zip(names, loras, strict=True):
        try:
            state = pipe.lora_state_dict(lora.source)
            # diffusers' own layout goes in by its path, so the file's metadata (lora_alpha) is read.
            source = (
                lora.source
                if lora_layouts.is_diffusers_layout(state)
                else lora_layouts.to_diffusers_layout(state, pipe)
            )
            pipe.load_lora_weights(source, adapter_name=name)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise LoraError(f"LoRA {lora.source!r} could not be loaded: {exc}") from exc
        if not _adapter_present(pipe, name):
            pipe.unload_lora_weights()
            raise LoraError(
                f"LoRA {lora.source!r} holds no layer of this model (a LoRA for another model family?)"
            )
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()  # the merged weights stay; the PEFT layers go
    return [f"{lora.source} × {lora.scale:g}" for lora in loras]


def _adapter_present(pipe: Any, name: str) -> bool:
    for component in ("transformer", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, component, None)
        if module is None:
            continue
        config = getattr(module, "peft_config", None)
        if config and name in config:
            return True
    return False
