"""The named choices of loading, memory and sampling, as `Literal` types.

Declared here, where the pipeline acts on them, so that `server/config.py` types its settings with
the very values the pipeline accepts (and the CLI lists them) without `pipelines` importing `server`.
"""

from __future__ import annotations

from typing import Literal

Device = Literal["auto", "cuda", "mps", "cpu"]
Dtype = Literal["auto", "fp16", "bf16", "fp32"]

# Where the weights live (pipelines/memory.py); `MemoryMode` adds "auto": chosen from free memory.
Placement = Literal["device", "model_offload", "sequential_offload"]
MemoryMode = Literal["auto", Placement]
# The T5-XXL encoder: whole, in 8-bit, or left out; `T5Choice` adds "auto" (never "off").
T5Mode = Literal["full", "8bit", "off"]
T5Choice = Literal["auto", T5Mode]
# A memory saver forced on or off, or "auto": on when the free memory calls for it.
Switch = Literal["auto", "on", "off"]
# The transformer's linear layers quantized by torchao (pipelines/transformer_quantization.py).
TransformerQuant = Literal["off", "int8", "fp8"]
# The attention kernel (pipelines/attention.py): auto picks FlashAttention 4/3 where installed and
# supported, else PyTorch's own choice ("sdpa").
AttentionChoice = Literal["auto", "sdpa", "cudnn", "fa3", "fa4"]
# What torch.compile captures (pipelines/compilation.py): each transformer block, or the whole.
CompileScope = Literal["blocks", "whole"]
# The opt-in step cache's levels (pipelines/step_cache.py): "off" is the exact loop.
StepCacheLevel = Literal["off", "fast", "faster"]

# Which ComfyUI conventions of the negative prompt's timestep window are followed
# (schedulers/guidance.py).
NegativeWindowWiring = Literal["a", "b"]
PercentRule = Literal["current", "legacy"]

# The SD3 model families one server can serve (pipelines/families.py). Large Turbo has Large's
# architecture with distilled weights, so only a setting (or its Hub id) tells them apart.
Family = Literal["sd3-medium", "sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium"]
FamilyChoice = Literal["auto", Family]
