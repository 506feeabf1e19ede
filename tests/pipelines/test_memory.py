"""The memory plan: what `auto` picks for each amount of free memory, and savers that keep the image."""

from __future__ import annotations

import pytest
import torch

from pipelines.joint_attention import JointAttention
from pipelines.memory import GiB, plan_memory
from pipelines.options import Switch, T5Choice
from pipelines.request import GenerationRequest
from pipelines.sd3 import SD3Generator
from server.runtime import Runtime

CUDA = torch.device("cuda")


@pytest.mark.parametrize(
    ("free_gib", "placement"),
    # T5 alone is 10.7 GiB in fp16 (its `wo` layers stay fp32), so model offload with T5 on the GPU
    # needs ~12 GiB; below that T5 runs on the CPU, and below ~6 GiB everything is streamed.
    [(80, "device"), (24, "device"), (16, "model_offload"), (12, "model_offload"), (4, "sequential_offload")],
)
def test_auto_follows_free_memory_on_cuda(
    free_gib: float, placement: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pipelines.memory.bitsandbytes_available", lambda device: False)
    plan = plan_memory(mode="auto", device=CUDA, free_bytes=int(free_gib * GiB))
    assert plan.placement == placement
    assert plan.t5 == "full"  # without bitsandbytes T5 stays whole: dropping it would change the image
    assert plan.vae_tiling is (free_gib < 24)  # 2048² decodes must fit where 1024² does
    assert not plan.attention_slicing


@pytest.mark.parametrize(
    ("free_gib", "placement", "t5"),
    [
        (24, "device", "full"),  # everything fits: the exact T5
        (16, "device", "8bit"),  # resident beats offloading, and fits only with T5 in 8-bit
        (13, "model_offload", "full"),  # both T5s fit under offload: the exact one
        (10, "model_offload", "8bit"),  # only the 8-bit T5 fits under offload
        (5, "sequential_offload", "full"),  # not even the rest fits whole: stream everything
    ],
)
def test_auto_takes_t5_in_8bit_only_where_it_buys_a_faster_plan(
    free_gib: float, placement: str, t5: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pipelines.memory.bitsandbytes_available", lambda device: True)
    plan = plan_memory(mode="auto", device=CUDA, free_bytes=int(free_gib * GiB))
    assert (plan.placement, plan.t5) == (placement, t5)
    assert f"{free_gib:.1f} GiB free" in plan.reason


@pytest.mark.parametrize(
    ("free_gib", "t5_on_cpu", "placement", "on_cpu"),
    [
        (10, "auto", "device", True),  # T5 fits nowhere on the GPU with the rest: the rest stays resident
        (7, "auto", "model_offload", True),  # an 8 GB card: T5 on the CPU, the rest offloaded
        (13, "auto", "model_offload", False),  # T5 fits under offload: it stays on the GPU
        (7, "off", "sequential_offload", False),  # T5 must stay on the GPU: stream it
        (24, "on", "device", True),  # asked for: T5 on the CPU, the rest resident
    ],
)
def test_t5_goes_to_the_cpu_only_where_no_gpu_plan_fits_it(
    free_gib: float, t5_on_cpu: Switch, placement: str, on_cpu: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pipelines.memory.bitsandbytes_available", lambda device: False)
    plan = plan_memory(mode="auto", device=CUDA, free_bytes=int(free_gib * GiB), t5_on_cpu=t5_on_cpu)
    assert (plan.placement, plan.t5, plan.t5_on_cpu) == (placement, "full", on_cpu)
    assert ("T5 on the CPU" in plan.describe()) is on_cpu
    # Without T5 there is nothing to put on the CPU, whatever was asked.
    assert not plan_memory(mode="auto", device=CUDA, free_bytes=7 * GiB, t5="off", t5_on_cpu="on").t5_on_cpu


@pytest.mark.parametrize(
    ("t5", "free_gib", "placement"),
    [
        ("off", 8, "device"),
        ("off", 6, "model_offload"),
        ("off", 4, "sequential_offload"),
        ("full", 13, "model_offload"),
    ],
)
def test_auto_places_for_the_t5_the_user_chose(
    t5: T5Choice, free_gib: float, placement: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pipelines.memory.bitsandbytes_available", lambda device: True)
    plan = plan_memory(mode="auto", device=CUDA, free_bytes=int(free_gib * GiB), t5=t5)
    assert (plan.placement, plan.t5) == (placement, t5)


def test_explicit_choices_win_and_impossible_ones_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pipelines.memory.bitsandbytes_available", lambda device: False)
    plan = plan_memory(
        mode="sequential_offload",
        device=CUDA,
        free_bytes=80 * GiB,
        t5="off",
        vae_tiling="on",
        attention_slicing="on",
    )
    assert (plan.placement, plan.t5, plan.vae_tiling, plan.attention_slicing) == (
        "sequential_offload",
        "off",
        True,
        True,
    )
    with pytest.raises(ValueError, match="bitsandbytes"):
        plan_memory(mode="auto", device=CUDA, free_bytes=80 * GiB, t5="8bit")


def test_cpu_and_mps_plans() -> None:
    cpu = plan_memory(mode="model_offload", device=torch.device("cpu"), free_bytes=None)
    assert cpu.placement == "device" and not cpu.vae_tiling
    mac = plan_memory(mode="auto", device=torch.device("mps"), free_bytes=16 * GiB)
    assert mac.placement == "device" and mac.attention_slicing and mac.vae_tiling


def test_sliced_attention_gives_the_same_image(runtime: Runtime) -> None:
    generator = runtime.generator
    assert isinstance(generator, SD3Generator)
    transformer = generator.pipe.transformer
    request = GenerationRequest(prompt="a cathedral", seed=3, width=512, height=512, steps=10)
    plain = generator.generate(request).images[0].astype(int)
    original = transformer.attn_processors
    try:
        transformer.set_attn_processor(JointAttention(query_chunk=100))
        sliced = generator.generate(request).images[0].astype(int)
    finally:
        transformer.set_attn_processor(original)
    assert abs(plain - sliced).max() <= 1


@pytest.mark.parametrize(
    ("device", "free_gib", "expected"),
    [
        ("cpu", None, "all weights on the device; with T5; no VAE tiling or attention slicing (cpu: "),
        ("cuda", 7.0, "model CPU offload (one component on the GPU at a time); with T5 on the CPU; VAE"),
        ("cuda", 2.0, "sequential CPU offload (weights streamed layer by layer); with T5; VAE tiling"),
    ],
)
def test_the_plan_is_described_in_words_people_read(
    device: str, free_gib: float | None, expected: str
) -> None:
    free = None if free_gib is None else int(free_gib * GiB)
    description = plan_memory(mode="auto", device=torch.device(device), free_bytes=free).describe()
    assert description.startswith(expected), description
    # Not the old "device, T5 (cpu: everything on the device)": no bare setting names.
    assert "device," not in description and "_" not in description
