"""The memory plan: where the weights live and which memory savers are on.

SD3 Medium's weights in an fp16 load are about three times as large with T5-XXL as without
(docs/performance.md §1), so an H100 holds everything, a 24 GB card holds everything at 1024², and
an 8 GB card needs offloading. `plan_memory` turns the user's choice — or, with `auto`, the
device's free memory — into one `MemoryPlan`; `apply_plan` carries it out on a loaded pipeline.
Each saver trades speed (or, without T5, the image) for memory, so `auto` turns on only what the
free memory calls for; docs/performance.md §3 says what each one saves and costs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pipelines.joint_attention import JointAttention
from pipelines.loading import cpu_has_native_bf16
from pipelines.options import Family, MemoryMode, Placement, Switch, T5Choice, T5Mode
from pipelines.quantization import MIN_BITSANDBYTES, bitsandbytes_problem

log = logging.getLogger(__name__)

GiB = 2**30


@dataclass(frozen=True)
class MemoryPlan:
    placement: Placement
    t5: T5Mode
    vae_tiling: bool
    attention_slicing: bool
    reason: str
    # T5 kept and run on the CPU, out of the placement: the rest of the model then needs ~6 GiB of
    # the GPU instead of T5's 10.7, at the price of encoding new prompts on the CPU.
    t5_on_cpu: bool = False

    def describe(self) -> str:
        """One phrase for people: where the weights live, which T5, which savers, and why."""
        parts = [_PLACEMENT_WORDS[self.placement], _t5_words(self.t5, on_cpu=self.t5_on_cpu)]
        flags = (("VAE tiling", self.vae_tiling), ("attention slicing", self.attention_slicing))
        savers = [name for name, on in flags if on]
        parts.append(" and ".join(savers) if savers else "no VAE tiling or attention slicing")
        return f"{'; '.join(parts)} ({self.reason})"


_PLACEMENT_WORDS: dict[Placement, str] = {
    "device": "all weights on the device",
    "model_offload": "model CPU offload (one component on the GPU at a time)",
    "sequential_offload": "sequential CPU offload (weights streamed layer by layer)",
}


def _t5_label(mode: T5Mode, *, on_cpu: bool) -> str:
    label = {"full": "T5", "8bit": "T5 in 8-bit", "off": "no T5"}[mode]
    return f"{label} on the CPU" if on_cpu and mode != "off" else label


def _t5_words(mode: T5Mode, *, on_cpu: bool) -> str:
    if mode == "off":
        return "without T5 (a CLIP-only context)"
    return f"with {_t5_label(mode, on_cpu=on_cpu)}"


def free_memory(device: torch.device) -> int | None:
    """Free accelerator memory in bytes, or None where it cannot be known (CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "mps":
        # Unified memory: what Metal recommends for one process is the practical ceiling.
        return int(torch.mps.recommended_max_memory())
    return None


def bitsandbytes_available(device: torch.device) -> bool:
    """Whether LLM.int8 can run on `device`: bitsandbytes ≥ 0.48 has CUDA and CPU kernels."""
    return device.type in ("cuda", "cpu") and bitsandbytes_problem() is None


def plan_memory(
    *,
    mode: MemoryMode,
    device: torch.device,
    free_bytes: int | None,
    t5: T5Choice = "auto",
    t5_on_cpu: Switch = "auto",
    vae_tiling: Switch = "auto",
    attention_slicing: Switch = "auto",
    family: Family = "sd3-medium",
) -> MemoryPlan:
    """Choose the plan. Explicit settings win; `auto` takes the fastest plan whose need fits."""
    can_8bit = bitsandbytes_available(device)
    if mode == "auto":
        placement, auto_t5, auto_cpu, reason = _auto_placement(
            device, free_bytes, can_8bit, t5, t5_on_cpu, family
        )
    else:
        placement, auto_t5, auto_cpu, reason = mode, "full", False, f"--memory-mode {mode}"
    if placement != "device" and device.type == "cpu":
        placement, reason = "device", "on a CPU there is nothing to offload to"
    chosen_t5: T5Mode = auto_t5 if t5 == "auto" else t5
    if chosen_t5 == "8bit" and not can_8bit:
        raise ValueError(
            "T5 in 8-bit needs a CUDA GPU or the CPU, and bitsandbytes "
            f"(pip install 'bitsandbytes>={MIN_BITSANDBYTES}')"
        )
    # On a CPU device T5 is on the CPU anyway; elsewhere an explicit choice wins over auto's.
    on_cpu = device.type != "cpu" and chosen_t5 != "off" and _choice(t5_on_cpu, default=auto_cpu)
    small = free_bytes is not None and free_bytes < 24 * GiB
    tiling = _choice(vae_tiling, default=device.type != "cpu" and small)
    # SDPA on CUDA and CPU never materialises the attention matrix; MPS may, and on a small Mac a
    # 2048² attention matrix alone would not fit.
    slicing = _choice(
        attention_slicing, default=device.type == "mps" and free_bytes is not None and free_bytes < 64 * GiB
    )
    return MemoryPlan(placement, chosen_t5, tiling, slicing, reason, t5_on_cpu=on_cpu)


def _choice(value: Switch, *, default: bool) -> bool:
    return default if value == "auto" else value == "on"


# GiB of free device memory each plan needs for SD3 Medium in fp16 at 1024², computed from the
# component sizes: transformer 3.78, CLIP-G 1.29, CLIP-L 0.23, VAE 0.16 GiB; T5-XXL 10.74 GiB
# (transformers keeps its 1.0 B-parameter `wo` layers in fp32 for fp16 loads), 7.37 GiB in 8-bit
# (int8 for all but `wo`); no T5 5.46 GiB. Resident plans add ~2 GiB of activations and VAE decode
# (tiled below 24 GiB); under model offload the peak is the largest component on the device plus
# its activations: T5 (+0.5 GiB at 77 tokens) or the transformer and VAE (+2 GiB); with T5 on the
# CPU only the latter. These are computed, not measured on a GPU (benchmarks/gpu_check.sh measures
# them). Per T5 mode, fastest plan first: (placement, T5 on the CPU, GiB needed).
_NEEDS_GIB: dict[T5Mode, list[tuple[Placement, bool, float]]] = {
    "full": [
        ("device", False, 20.0),
        ("model_offload", False, 12.0),
        ("device", True, 8.0),
        ("model_offload", True, 6.0),
    ],
    "8bit": [
        ("device", False, 15.0),
        ("model_offload", False, 8.5),
        ("device", True, 8.0),
        ("model_offload", True, 6.0),
    ],
    "off": [("device", False, 8.0), ("model_offload", False, 6.0)],
}

# The SD3.5 families share SD3 Medium's text encoders and VAE; only the transformer differs (fp16
# GiB of its parameters, pipelines/architectures.py) and with its width its activations at 1024²:
# Large 8.06 B parameters (15.0 GiB) 2432 wide, Medium 2.24 B (4.18 GiB) as wide as SD3 Medium.
_TRANSFORMER_GIB: dict[Family, tuple[float, float]] = {  # (weights, activations + VAE decode)
    "sd3-medium": (3.78, 2.0),
    "sd3.5-medium": (4.18, 2.0),
    "sd3.5-large": (15.01, 2.0 * 2432 / 1536),
    "sd3.5-large-turbo": (15.01, 2.0 * 2432 / 1536),
}
_VAE_GIB = 0.16


def needs_gib(family: Family = "sd3-medium") -> dict[T5Mode, list[tuple[Placement, bool, float]]]:
    """The plans' needs for `family`: SD3 Medium's, with the transformer's difference added wherever
    the transformer is part of the peak (every resident plan, and model offload once the transformer
    and its activations outweigh T5), rounded up to half a GiB."""
    weights, activations = _TRANSFORMER_GIB[family]
    base_weights, base_activations = _TRANSFORMER_GIB["sd3-medium"]
    extra = weights - base_weights + activations - base_activations
    denoising_peak = weights + _VAE_GIB + activations

    def need(placement: Placement, t5_on_gpu: bool, medium: float) -> float:
        # Model offload with T5 on the GPU peaks at T5's load or the denoiser's, whichever is larger.
        resident = placement == "device" or not t5_on_gpu
        value = medium + extra if resident else max(medium, denoising_peak)
        return math.ceil(value * 2) / 2

    return {
        mode: [
            (placement, cpu, need(placement, mode != "off" and not cpu, gib)) for placement, cpu, gib in plans
        ]
        for mode, plans in _NEEDS_GIB.items()
    }


def _auto_placement(
    device: torch.device,
    free: int | None,
    can_8bit: bool,
    t5: T5Choice = "auto",
    t5_on_cpu: Switch = "auto",
    family: Family = "sd3-medium",
) -> tuple[Placement, T5Mode, bool, str]:
    """The fastest placement that fits, for the T5 asked for (`auto` never drops T5: it would change
    the image, but takes 8-bit when bitsandbytes is there and it lets a faster placement fit).

    Keeping T5 on the CPU comes after every plan that fits it on the GPU: a new prompt is then
    encoded on the CPU (seconds; the prompt cache makes repeats free), which still beats streaming
    the whole model layer by layer at every step.
    """
    if free is None or device.type != "cuda":
        # The CPU, and MPS's unified memory, have no separate pool that offloading would spare.
        return "device", "full", False, f"{device.type}: no separate device memory to offload from"
    gib = free / GiB
    if t5 == "auto":
        modes: list[T5Mode] = ["full", "8bit"] if can_8bit else ["full"]
    else:
        modes = [t5]
    options = sorted(
        ((placement, mode, cpu, need) for mode in modes for placement, cpu, need in needs_gib(family)[mode]),
        key=lambda option: (option[2], option[0] != "device", option[1] != "full"),
    )
    for placement, mode, cpu, need in options:
        if mode != "off" and (cpu and t5_on_cpu == "off" or not cpu and t5_on_cpu == "on"):
            continue
        if gib >= need:
            what = _t5_label(mode, on_cpu=cpu)
            return placement, mode, cpu, f"{gib:.1f} GiB free; this plan with {what} needs ~{need:g} GiB"
    # Sequential offload streams weights layer by layer and fits nearly anything, with the T5 asked
    # for (`auto`: the whole T5, which keeps the image exact).
    streamed: T5Mode = "full" if t5 == "auto" else t5
    return "sequential_offload", streamed, False, f"{gib:.1f} GiB free: too little for any faster plan"


def apply_plan(pipe: Any, plan: MemoryPlan, device: torch.device) -> None:
    """Place a freshly loaded pipeline (still on the CPU) as the plan says."""
    t5 = pipe.text_encoder_3 if plan.t5_on_cpu else None
    if t5 is not None:
        # Out of the pipeline while the rest is placed, so that no offload hook or move takes it.
        pipe.text_encoder_3 = None
    if plan.placement == "model_offload":
        pipe.enable_model_cpu_offload(device=device)
    elif plan.placement == "sequential_offload":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    if plan.vae_tiling:
        pipe.vae.enable_tiling()
        # SD3's VAE tiles only above its sample_size (1024 px): on small cards tile from 512 px
        # so that 1024² decodes fit too (docs/performance.md §5).
        pipe.vae.tile_sample_min_size = min(pipe.vae.tile_sample_min_size, 512)
        pipe.vae.tile_latent_min_size = min(pipe.vae.tile_latent_min_size, 64)
    if plan.attention_slicing:
        # The VAE's own attention runs at the latent's resolution; tiling is what bounds it.
        pipe.transformer.set_attn_processor(JointAttention(query_chunk=1024))
    if t5 is not None:
        dtype = cpu_t5_dtype(t5, quantized=plan.t5 == "8bit")
        # No dtype argument at all for an 8-bit T5: transformers refuses any cast of a bitsandbytes model.
        pipe.text_encoder_3 = t5.to("cpu") if dtype is None else t5.to("cpu", dtype=dtype)
        if plan.t5 != "8bit" and pipe.text_encoder_3.dtype == torch.float16:
            multiply_in_fp32(pipe.text_encoder_3)
    log.info("memory plan: %s", plan.describe())


def cpu_t5_dtype(t5: Any, *, quantized: bool) -> torch.dtype | None:
    """The precision T5 runs in on the CPU, beside a half-precision model on a GPU (None: as loaded).

    fp16 matmuls are the slowest a CPU does (60 GFLOP/s against fp32's 161 and bf16's 862 on this
    workplace's Zen 4, benchmarks/cpu_matmul.py: 12 s of T5-XXL per new prompt instead of 0.8 s), so
    an fp16 T5 runs in bf16 where the CPU has it natively; T5 was trained in bf16, and fp16 is the
    precision it overflows in. Elsewhere it stays fp16, since fp32 would double its 9.5 GB of host
    memory, and its matmuls run in fp32 (`multiply_in_fp32`). An 8-bit T5 is left as bitsandbytes
    built it.
    """
    if quantized or t5.dtype != torch.float16:
        return None
    return torch.bfloat16 if cpu_has_native_bf16() else None


class _Fp32MatmulLinear(torch.nn.Linear):
    """A half-precision Linear that multiplies in fp32 and answers in its input's dtype."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(input.float(), self.weight.float(), bias).to(input.dtype)


def multiply_in_fp32(module: torch.nn.Module) -> None:
    """Make the fp16 Linear layers of a model that stays fp16 on the CPU multiply in fp32.

    A CPU without native bf16 multiplies fp16 at a fifth of fp32's rate (14 against 69 GFLOP/s on an
    AVX2-only EPYC, benchmarks/cpu_matmul.py), and converting the weight at each call costs less
    than that difference: there T5-XXL encoded a prompt in 21.7 s instead of 43.6 on one core, the
    weights staying fp16 in memory and the encoding within two fp16 steps of fp16's own.
    """
    for layer in module.modules():
        # Exactly nn.Linear: bitsandbytes' 8-bit layers subclass it and must keep their own forward.
        if type(layer) is torch.nn.Linear and layer.weight.dtype == torch.float16:
            layer.__class__ = _Fp32MatmulLinear
