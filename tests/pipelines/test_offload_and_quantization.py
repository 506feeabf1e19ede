"""The memory savers that move or shrink weights, run for real on the CPU with the tiny model.

No GPU here, but the machinery is the real one: diffusers' `enable_model_cpu_offload` and
`enable_sequential_cpu_offload` install accelerate's hooks with the CPU as their execution device,
and bitsandbytes (≥ 0.48 has CPU kernels) quantizes T5 to LLM.int8. What is checked is that our own
loop — which calls the text encoders, the transformer and the VAE directly rather than through
`pipe(...)` — drives those hooks and layers correctly and gets the image it gets without them.
What the CPU cannot show is the host-to-GPU traffic itself: on a GPU machine the same tests run
there with `SD3_TEST_DEVICE=cuda` (benchmarks/gpu_check.sh does), offloading to the real device.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from accelerate.hooks import AlignDevicesHook, SequentialHook

from pipelines import step_cache
from pipelines.checkpoints import export_single_file
from pipelines.loading import LoadedModel, ModelSpec, load_model
from pipelines.memory import MemoryPlan, _Fp32MatmulLinear, apply_plan, cpu_t5_dtype, plan_memory
from pipelines.options import Device, Placement, T5Mode
from pipelines.request import GenerationRequest
from pipelines.sd3 import SD3Generator
from server.runtime import Runtime

# The test extra installs bitsandbytes; where it is missing (a GPU machine it could not be carried to),
# the 8-bit tests skip and the offload tests still run.
needs_bnb = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="the test extra installs bitsandbytes"
)

CPU = torch.device("cpu")
DEVICE = torch.device(os.environ.get("SD3_TEST_DEVICE", "cpu"))

REQUEST = GenerationRequest(
    prompt="a (red:1.2) fox in the snow",
    negative_prompt="blurry",
    samples=2,
    scheduler="dpmpp_2m",
    steps=8,
    seed=5,
    width=512,
    height=384,
    cond_start=0.1,
)


def device_option() -> Device:
    """DEVICE as ModelSpec names it."""
    match DEVICE.type:
        case "cuda" | "mps" | "cpu" as name:
            return name
    raise ValueError(f"SD3_TEST_DEVICE={DEVICE}: not a device that ModelSpec takes")


def load_tiny(tiny_dir: Path, source: Path | None = None, **spec: Any) -> LoadedModel:
    return load_model(
        ModelSpec(
            source=str(source or tiny_dir), tiny_dir=tiny_dir, device=device_option(), dtype="fp32", **spec
        )
    )


def images(loaded: LoadedModel, request: GenerationRequest = REQUEST) -> np.ndarray:
    return np.stack(SD3Generator(loaded).generate(request).images).astype(int)


@pytest.fixture(scope="module")
def resident(tiny_dir: Path) -> np.ndarray:
    return images(load_tiny(tiny_dir))


def plan(
    placement: Placement,
    *,
    t5: T5Mode = "full",
    tiling: bool = False,
    slicing: bool = False,
    t5_on_cpu: bool = False,
) -> MemoryPlan:
    return MemoryPlan(placement, t5, tiling, slicing, "test", t5_on_cpu=t5_on_cpu)


def run_hooks_on_cpu(pipe: Any) -> int:
    """Count the sequential-offload hooks; on the CPU, point them at "cpu" instead of "cpu:0".

    diffusers always names the execution device `<type>:<index>`. On a GPU that is where the
    weight lands, so accelerate's later move of the same weight back to meta keeps it a Parameter;
    from "cpu" to "cpu:0" torch makes a copy, which comes back a plain tensor that accelerate can
    then no longer offload. Only the CPU-as-accelerator stand-in needs the repointing.
    """
    hooks = [
        h
        for component in pipe.components.values()
        if isinstance(component, torch.nn.Module)
        for module in component.modules()
        for h in _hooks_of(module)
        if isinstance(h, AlignDevicesHook)
    ]
    if DEVICE.type == "cpu":
        for h in hooks:
            h.execution_device = CPU
    return len(hooks)


def _hooks_of(module: torch.nn.Module) -> list[Any]:
    hook = getattr(module, "_hf_hook", None)
    return hook.hooks if isinstance(hook, SequentialHook) else [hook]


def test_model_offload_hooks_drive_our_loop(tiny_dir: Path, resident: np.ndarray) -> None:
    loaded = load_tiny(tiny_dir, place_on_device=False)
    apply_plan(loaded.pipe, plan("model_offload"), DEVICE)
    pipe = loaded.pipe
    components = (pipe.text_encoder, pipe.text_encoder_3, pipe.transformer, pipe.vae)
    assert all(getattr(module, "_hf_hook", None) is not None for module in components)
    generator = SD3Generator(loaded)
    first = np.stack(generator.generate(REQUEST).images).astype(int)
    # The second call finds both prompts in the cache: only the transformer and VAE hooks fire.
    second = np.stack(generator.generate(REQUEST).images).astype(int)
    # Offloading copies each weight to a fresh allocation, and CPU kernels round by alignment
    # (see test_single_file.realigned): at most 1/255 apart.
    assert np.abs(first - resident).max() <= 1
    assert np.array_equal(first, second)


@pytest.mark.parametrize("slicing", [False, True], ids=["sdpa", "sliced-attention"])
def test_sequential_offload_keeps_no_weight_resident_and_the_same_image(
    tiny_dir: Path, resident: np.ndarray, slicing: bool
) -> None:
    loaded = load_tiny(tiny_dir, place_on_device=False)
    apply_plan(loaded.pipe, plan("sequential_offload", slicing=slicing), DEVICE)
    assert run_hooks_on_cpu(loaded.pipe) > 100  # one hook per leaf module
    got = images(loaded)
    assert np.array_equal(got, resident)
    # Between forwards every weight is back on the meta device: only the hooks' CPU copy holds it.
    transformer = loaded.pipe.transformer
    assert all(p.is_meta for p in transformer.parameters())


def test_vae_tiling_under_sequential_offload(tiny_dir: Path) -> None:
    request = GenerationRequest(prompt="a harbour", seed=2, width=1024, height=768, steps=6)
    tiled = load_tiny(tiny_dir)
    apply_plan(tiled.pipe, plan("device", tiling=True), DEVICE)
    offloaded = load_tiny(tiny_dir, place_on_device=False)
    apply_plan(offloaded.pipe, plan("sequential_offload", tiling=True), DEVICE)
    run_hooks_on_cpu(offloaded.pipe)
    assert offloaded.pipe.vae.use_tiling and offloaded.pipe.vae.tile_sample_min_size == 512
    assert np.array_equal(images(offloaded, request), images(tiled, request))


@pytest.mark.parametrize("t5", ["full", pytest.param("8bit", marks=needs_bnb)])
def test_t5_on_the_cpu_beside_model_offload(tiny_dir: Path, t5: T5Mode) -> None:
    """The 8 GB-card plan: T5 stays on the CPU, out of the offload chain; the rest is offloaded."""
    reference = load_tiny(tiny_dir, t5_8bit=t5 == "8bit")
    loaded = load_tiny(tiny_dir, t5_8bit=t5 == "8bit", place_on_device=False, t5_on_cpu=True)
    apply_plan(loaded.pipe, plan("model_offload", t5=t5, t5_on_cpu=True), DEVICE)
    pipe = loaded.pipe
    assert getattr(pipe.text_encoder_3, "_hf_hook", None) is None  # no hook moves it to the GPU
    assert all(p.device.type == "cpu" for p in pipe.text_encoder_3.parameters())
    assert all(
        getattr(m, "_hf_hook", None) is not None for m in (pipe.text_encoder, pipe.transformer, pipe.vae)
    )
    got = np.stack(SD3Generator(loaded, t5_on_cpu=True).generate(REQUEST).images).astype(int)
    # On a GPU, T5 on the CPU rounds differently from T5 on the GPU, so the image may move a little.
    assert np.abs(got - images(reference)).max() <= (1 if DEVICE.type == "cpu" else 8)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_an_fp16_t5_on_the_cpu_runs_in_bf16_where_the_cpu_has_it(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, native_bf16: bool
) -> None:
    import pipelines.memory

    monkeypatch.setattr(pipelines.memory, "cpu_has_native_bf16", lambda: native_bf16)
    loaded = load_model(
        ModelSpec(source=str(tiny_dir), tiny_dir=tiny_dir, device="cpu", dtype="fp16", t5_on_cpu=True)
    )
    apply_plan(loaded.pipe, plan("device", t5_on_cpu=True), CPU)
    t5 = loaded.pipe.text_encoder_3
    assert t5.dtype == (torch.bfloat16 if native_bf16 else torch.float16)
    assert loaded.pipe.transformer.dtype == torch.float16  # the rest as loaded
    context = SD3Generator(loaded, t5_on_cpu=True).encode("a fox")
    assert context.context.dtype == torch.float16 and bool(context.context.isfinite().all())
    # Without native bf16 the weights stay fp16 and the matmuls run in fp32 (fp16's are 5x slower
    # there): every fp16 Linear, and no other layer.
    kinds = {(type(m), m.weight.dtype) for m in t5.modules() if isinstance(m, torch.nn.Linear)}
    if native_bf16:
        assert kinds == {(torch.nn.Linear, torch.bfloat16)}
    else:
        assert kinds == {(_Fp32MatmulLinear, torch.float16), (torch.nn.Linear, torch.float32)}  # `wo`
        plain = load_model(ModelSpec(source=str(tiny_dir), tiny_dir=tiny_dir, device="cpu", dtype="fp16"))
        expected = SD3Generator(plain).encode("a fox").context
        assert plain.pipe.text_encoder_3.dtype == torch.float16
        # The same fp16 answer, but for the last bit of some values (fp16's own matmul rounds within).
        torch.testing.assert_close(context.context, expected, rtol=2e-3, atol=2e-3)


def test_an_8bit_t5_on_the_cpu_stays_as_bitsandbytes_built_it(t5_8bit: LoadedModel) -> None:
    assert cpu_t5_dtype(t5_8bit.pipe.text_encoder_3, quantized=True) is None


# -- T5 in 8-bit ---------------------------------------------------------------------------------


def linear_layers(t5: torch.nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in t5.named_modules() if isinstance(m, torch.nn.Linear)}


def assert_t5_is_int8(loaded: LoadedModel) -> None:
    import bitsandbytes as bnb

    t5 = loaded.pipe.text_encoder_3
    layers = linear_layers(t5)
    quantized = {name for name, cls in layers.items() if cls is bnb.nn.Linear8bitLt}
    # As transformers does it: everything but T5's feed-forward output `wo`, kept in full precision.
    assert quantized == {name for name in layers if not name.endswith(".wo")}
    assert quantized and all(t5.get_submodule(n).weight.dtype == torch.int8 for n in quantized)


@pytest.fixture(scope="module")
def t5_8bit(tiny_dir: Path) -> LoadedModel:
    pytest.importorskip("bitsandbytes", reason="the test extra installs bitsandbytes")
    return load_tiny(tiny_dir, t5_8bit=True)


def test_t5_in_8bit_from_a_folder_runs_on_the_cpu(t5_8bit: LoadedModel, resident: np.ndarray) -> None:
    assert_t5_is_int8(t5_8bit)
    got = images(t5_8bit)
    # A quantized T5 is a (slightly) different encoder, so the image moves, but only a little:
    # int8 rows with fp16 outliers keep the encoding within a few percent.
    assert not np.array_equal(got, resident)
    assert np.abs(got - resident).mean() < 8


def test_t5_in_8bit_is_the_same_from_a_single_file(
    t5_8bit: LoadedModel, runtime: Runtime, tiny_dir: Path, tmp_path: Path
) -> None:
    configs = tmp_path / "configs"
    shutil.copytree(tiny_dir, configs, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    assert isinstance(runtime.generator, SD3Generator)
    path = export_single_file(runtime.generator.pipe, tmp_path / "tiny_incl_clips_t5xxl.safetensors")
    single = load_tiny(tiny_dir, source=path, config=str(configs), t5_8bit=True)
    assert_t5_is_int8(single)
    # The same fp32 weights quantized by the same bitsandbytes code: the same int8 tensors.
    expected = t5_8bit.pipe.text_encoder_3.state_dict()
    for key, tensor in single.pipe.text_encoder_3.state_dict().items():
        if tensor.dtype == torch.int8:
            assert torch.equal(tensor, expected[key]), key


@needs_bnb
def test_t5_in_8bit_for_random_weights(tmp_path: Path) -> None:
    spec = ModelSpec(source="random:small", tiny_dir=tmp_path / "tiny", device=device_option(), t5_8bit=True)
    loaded = load_model(spec)
    assert_t5_is_int8(loaded)


def test_t5_in_8bit_under_model_offload(tiny_dir: Path, t5_8bit: LoadedModel) -> None:
    offloaded = load_tiny(tiny_dir, t5_8bit=True, place_on_device=False)
    apply_plan(offloaded.pipe, plan("model_offload", t5="8bit"), DEVICE)
    assert getattr(offloaded.pipe.text_encoder_3, "_hf_hook", None) is not None  # offloaded too (bnb ≥ 0.48)
    assert_t5_is_int8(offloaded)
    assert np.abs(images(offloaded) - images(t5_8bit)).max() <= 1


@needs_bnb  # the plan refuses 8-bit where bitsandbytes is missing
def test_the_plan_allows_8bit_on_cpu_and_cuda_only() -> None:
    assert plan_memory(mode="auto", device=CPU, free_bytes=None, t5="8bit").t5 == "8bit"
    assert plan_memory(mode="auto", device=CPU, free_bytes=None).t5 == "full"  # never picked unasked
    with pytest.raises(ValueError, match="bitsandbytes"):
        plan_memory(mode="auto", device=torch.device("mps"), free_bytes=32 * 2**30, t5="8bit")


def test_t5_in_8bit_under_sequential_offload(tiny_dir: Path, t5_8bit: LoadedModel) -> None:
    streamed = load_tiny(tiny_dir, t5_8bit=True, place_on_device=False)
    apply_plan(streamed.pipe, plan("sequential_offload", t5="8bit"), DEVICE)
    run_hooks_on_cpu(streamed.pipe)
    assert_t5_is_int8(streamed)
    assert np.abs(images(streamed) - images(t5_8bit)).max() <= 1


@pytest.mark.parametrize("placement", ["model_offload", "sequential_offload"])
def test_the_step_cache_runs_the_transformer_where_the_offload_hooks_put_it(
    tiny_dir: Path, placement: Placement, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cache calls the transformer's blocks, not its forward, which model offload hooks. The
    # random weights move too much between steps for a real threshold: reuse whatever moved.
    monkeypatch.setitem(step_cache.LEVELS, "faster", step_cache.StepCachePolicy(threshold=float("inf")))
    request = replace(REQUEST, scheduler="euler", steps=12, step_cache="faster")
    on_device = SD3Generator(load_tiny(tiny_dir)).generate(request)
    assert on_device.timings["cache_skipped"] > 0
    loaded = load_tiny(tiny_dir, place_on_device=False)
    apply_plan(loaded.pipe, plan(placement), DEVICE)
    if placement == "sequential_offload":
        run_hooks_on_cpu(loaded.pipe)
    assert np.abs(images(loaded, request) - np.stack(on_device.images).astype(int)).max() <= 1
