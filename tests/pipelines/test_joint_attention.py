"""Fused QKV projections and query slicing compute diffusers' joint attention for every SD3 family,
and fusing leaves no second copy of the weights it fuses. On the device SD3_TEST_DEVICE names (the CPU
unless set; benchmarks/gpu_check.sh runs them on its GPU)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipelines.architectures import ARCHITECTURES, build_components
from pipelines.joint_attention import JointAttention, fuse_qkv
from pipelines.request import GenerationRequest
from pipelines.sd3 import SD3Generator
from server.config import Settings
from server.runtime import load_runtime

# SD3 Medium's structure, SD3.5 Large's (RMS-normalised queries and keys) and SD3.5 Medium's (those
# and a second, image-only attention in its first blocks), at CPU size.
SCALES = ["small", "sd3.5-large-small", "sd3.5-medium-small"]
DEVICE = os.environ.get("SD3_TEST_DEVICE", "cpu")


def _transformer(scale: str, device: str = DEVICE) -> Any:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        arch = ARCHITECTURES[scale]  # type: ignore[index]
        return build_components(arch, device=device, dtype=torch.float32, with_t5=False)["transformer"]


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _forward(transformer: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return transformer(**inputs).sample


def _inputs(transformer: Any) -> dict[str, torch.Tensor]:
    config = transformer.config
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(2, config.in_channels, 32, 32, generator=generator),
        "encoder_hidden_states": torch.randn(2, 11, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(2, config.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([700.0, 300.0]),
    }
    return {name: tensor.to(DEVICE) for name, tensor in inputs.items()}


@pytest.mark.parametrize("scale", SCALES)
def test_fused_and_sliced_attention_compute_diffusers_attention(scale: str) -> None:
    plain = _transformer(scale)
    inputs = _inputs(plain)
    expected = _forward(plain, inputs)
    fused = copy.deepcopy(plain)
    assert fuse_qkv(fused) > 0
    sliced = copy.deepcopy(plain)
    sliced.set_attn_processor(JointAttention(query_chunk=100))
    both = copy.deepcopy(fused)
    both.set_attn_processor(JointAttention(query_chunk=100))
    for variant in (fused, sliced, both):
        difference = (_forward(variant, inputs) - expected).abs().max() / expected.abs().max()
        assert difference < 1e-5, (scale, float(difference))


# The parameters diffusers' own fusing adds at full size (the layers it fuses, kept beside the fused
# ones): in bf16, 0.63 GiB for SD3 Medium, 2.5 GiB for SD3.5 Large, 0.80 GiB for SD3.5 Medium.
KEPT_BY_DIFFUSERS = {"full": 0.340e9, "sd3.5-large": 1.349e9, "sd3.5-medium": 0.432e9}


@pytest.mark.parametrize("scale", list(KEPT_BY_DIFFUSERS))
def test_fusing_drops_the_layers_it_replaces(scale: str) -> None:
    """At full size, on the meta device: diffusers' fusing keeps a sixth more weights; ours none."""
    transformer = _transformer(scale, device="meta")
    before = _parameters(transformer)
    theirs = copy.deepcopy(transformer)
    theirs.fuse_qkv_projections()
    assert _parameters(theirs) - before == pytest.approx(KEPT_BY_DIFFUSERS[scale], rel=0.005)
    fuse_qkv(transformer)
    assert _parameters(transformer) == before
    names = {name.rsplit(".", 1)[-1] for name, _ in transformer.named_modules()}
    assert names.isdisjoint({"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"})
    assert "to_qkv" in names and "to_added_qkv" in names


# What a CUDA GPU holding the weights runs by default, with dynamo's capture alone (the eager backend).
CUDA_DEFAULTS = {"fuse_qkv": True, "compile": True, "compile_backend": "eager", "warmup_sizes": ["512x512"]}


@pytest.mark.parametrize("model", ["tiny:sd3.5-large", "tiny:sd3.5-medium"])
def test_a_server_with_the_cuda_defaults_gives_sd35_its_image(data_dir: Path, model: str) -> None:
    """Fused QKV and per-block compilation on SD3.5; diffusers' own fused processor dropped its
    qk-norm (25 levels of 255 away on the Large twin) and failed on the Medium twin."""
    request = GenerationRequest(prompt="a windmill", seed=8, width=512, height=512, steps=4)
    images = []
    for performance in ({"fuse_qkv": False, "compile": False}, CUDA_DEFAULTS):
        settings = Settings(
            data_dir=data_dir, model={"id": model, "device": DEVICE, "dtype": "fp32"}, performance=performance
        )
        generator = load_runtime(settings).generator
        assert isinstance(generator, SD3Generator)
        images.append(generator.generate(request).images[0].astype(np.int16))
    torch._dynamo.reset()
    assert np.abs(images[0] - images[1]).max() <= 1
