"""`load_runtime(settings)`: the model a server runs on, loaded, placed, quantized and compiled as its
settings say, before any app exists.

Loading is kept apart from the app (server/app.py) so that a missing or gated model fails the
`serve` command with one sentence before any port is bound, tests build the tiny model once and
share it between apps, and the benchmarks load exactly what a server would serve without the web
stack installed (benchmarks/gpu_check.sh runs where only the engine's packages can be brought).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pipelines.attention import activate as activate_attention
from pipelines.attention import choose as choose_attention
from pipelines.compilation import (
    compile_transformer,
    compile_vae_decoder,
    keep_compiled_code_in,
    on_by_default,
    warm_up,
)
from pipelines.families import expected_family
from pipelines.joint_attention import fuse_qkv
from pipelines.loading import ModelLoadError, ModelSpec, load_model, resolve_device
from pipelines.lora import LoraError, LoraSpec, fuse_loras
from pipelines.memory import MemoryPlan, apply_plan, free_memory, plan_memory
from pipelines.options import Family
from pipelines.sd3 import SamplingOptions, SD3Generator
from pipelines.transformer_quantization import quantization_caveat, quantization_problem, quantize_transformer
from server.config import Settings
from server.queue import BatchGenerator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    generator: BatchGenerator
    description: str
    device: str
    family: Family = "sd3-medium"  # which slugs it can serve (pipelines/families.py)


def model_spec(settings: Settings, plan: MemoryPlan) -> ModelSpec:
    model = settings.model
    return ModelSpec(
        source=model.id,
        tiny_dir=settings.tiny_model_dir,
        revision=model.revision,
        config=model.config,
        device=model.device,
        dtype=model.dtype,
        token=model.hf_token.get_secret_value() if model.hf_token else None,
        load_t5=plan.t5 != "off",
        t5_8bit=plan.t5 == "8bit",
        place_on_device=plan.placement == "device" and not plan.t5_on_cpu,
        t5_on_cpu=plan.t5_on_cpu,
        family=model.family,
    )


def memory_plan(settings: Settings) -> MemoryPlan:
    memory = settings.memory
    device = resolve_device(settings.model.device)
    try:
        return plan_memory(
            mode=memory.mode,
            device=device,
            free_bytes=free_memory(device),
            t5=memory.t5,
            t5_on_cpu=memory.t5_on_cpu,
            vae_tiling=memory.vae_tiling,
            attention_slicing=memory.attention_slicing,
            family=expected_family(settings.model.id, settings.model.family),
        )
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc


def load_runtime(settings: Settings) -> Runtime:
    """Load the model the settings name (raises `ModelLoadError` with a one-sentence reason)."""
    plan = memory_plan(settings)
    perf = settings.performance
    device = resolve_device(settings.model.device)
    problem = quantization_problem(perf.quantize, device=device, placement=plan.placement)
    kernel, unavailable = choose_attention(perf.attention, device)
    for reason in (problem, unavailable):
        if reason is not None:  # before minutes of loading
            raise ModelLoadError(reason)
    try:
        loras = [LoraSpec.parse(text) for text in settings.model.lora]  # a typo, also before loading
        loaded = load_model(model_spec(settings, plan))
        fused = fuse_loras(loaded.pipe, loras)  # before fused QKV and quantization replace their layers
    except LoraError as exc:
        raise ModelLoadError(str(exc)) from exc
    resident = plan.placement == "device"
    if on_by_default(perf.fuse_qkv, device=loaded.device, resident=resident):
        fuse_qkv(loaded.pipe.transformer)
    # Before the offload hooks and compilation, which must see the quantized layers.
    quantized = quantize_transformer(loaded.pipe.transformer, perf.quantize, device=loaded.device)
    caveat = quantization_caveat(perf.quantize, device=loaded.device)
    if caveat is not None:
        log.warning(caveat)
    apply_plan(loaded.pipe, plan, loaded.device)
    activate_attention(kernel)
    sampling = settings.sampling
    generator = SD3Generator(
        loaded,
        SamplingOptions(
            negative_window_wiring=sampling.negative_window_wiring,
            percent_rule=sampling.percent_rule,
            max_sequence_length=sampling.max_sequence_length,
            prompt_cache_bytes=settings.memory.prompt_cache_mb * 2**20,
        ),
        t5_on_cpu=plan.t5_on_cpu,
    )
    compile = on_by_default(perf.compile, device=loaded.device, resident=resident)
    if compile:
        keep_compiled_code_in(settings.data_dir / "inductor-cache")
        compile_transformer(
            loaded.pipe, scope=perf.compile_scope, mode=perf.compile_mode, backend=perf.compile_backend
        )
        compile_vae_decoder(loaded.pipe, mode=perf.compile_mode, backend=perf.compile_backend)
    if perf.warmup if perf.warmup is not None else compile:
        warm_up(generator, sizes=perf.warmup_shapes)
    precision = str(loaded.dtype).removeprefix("torch.")  # bfloat16 on a CPU with native bf16 (auto)
    return Runtime(
        generator=generator,
        description=f"{loaded.description}; {precision}; memory: {plan.describe()}"
        + (f"; LoRA: {', '.join(fused)}" if fused else "")
        + (f"; transformer in {perf.quantize} ({quantized} layers)" if quantized else "")
        + ("; slow here: this CPU has no int8 instructions" if caveat is not None else "")
        + (f"; attention: {kernel}" if kernel != "sdpa" else ""),
        device=str(loaded.device),
        family=loaded.family,
    )
