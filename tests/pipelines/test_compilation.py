"""Fused QKV and torch.compile leave the image as it is; the warm-up runs before serving."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipelines.compilation import keep_compiled_code_in, on_by_default
from pipelines.request import GenerationRequest
from pipelines.sd3 import SD3Generator
from server.config import Settings
from server.runtime import load_runtime

REQUEST = GenerationRequest(prompt="a windmill", seed=8, width=512, height=512, steps=10)


@pytest.mark.slow  # two model loads and dynamo's capture of the transformer (100 s on a busy 2-core machine)
def test_fused_qkv_and_compiled_transformer_give_the_same_image(data_dir: Path, tiny_dir: Path) -> None:
    plain = load_runtime(Settings(data_dir=data_dir, model={"id": "tiny", "dtype": "fp32"}))
    # The eager backend: dynamo's capture alone (inductor's code generation is the next test).
    fast = load_runtime(
        Settings(
            data_dir=data_dir,
            model={"id": "tiny", "dtype": "fp32"},
            performance={
                "compile": True,
                "compile_scope": "whole",
                "compile_backend": "eager",
                "fuse_qkv": True,
                "warmup_sizes": ["512x512"],
            },
        )
    )
    assert isinstance(plain.generator, SD3Generator) and isinstance(fast.generator, SD3Generator)
    transformer = fast.generator.pipe.transformer
    assert hasattr(transformer, "_orig_mod")  # compiled
    assert transformer._orig_mod.transformer_blocks[0].attn.fused_projections
    ours = plain.generator.generate(REQUEST).images[0].astype(np.int16)
    theirs = fast.generator.generate(REQUEST).images[0].astype(np.int16)
    assert np.abs(ours - theirs).max() <= 1
    torch._dynamo.reset()


@pytest.mark.slow  # inductor compiles C++ code for the CPU
def test_inductor_compiles_at_start_up_and_serves_without_recompiling(data_dir: Path, tiny_dir: Path) -> None:
    """The real backend (inductor's C++ code generation on the CPU, ~20 s here for the tiny model)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    plain = load_runtime(Settings(data_dir=data_dir, model={"id": "tiny", "dtype": "fp32"}))
    fast = load_runtime(
        Settings(
            data_dir=data_dir,
            model={"id": "tiny", "dtype": "fp32"},
            performance={"compile": True, "compile_backend": "inductor", "warmup_sizes": ["512x512"]},
        )
    )
    compiled_at_start = counters["stats"]["unique_graphs"]
    assert compiled_at_start > 0  # the warm-up compiled before the first request
    assert fast.generator.pipe.vae.decoder._compiled_call_impl is not None  # type: ignore[attr-defined]
    # Inductor's code is kept in the data folder (unless TORCHINDUCTOR_CACHE_DIR says otherwise), where
    # a restart finds it.
    cache = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    assert any(cache.rglob("*")), cache
    assert isinstance(plain.generator, SD3Generator) and isinstance(fast.generator, SD3Generator)
    ours = plain.generator.generate(REQUEST).images[0].astype(np.int16)
    theirs = fast.generator.generate(REQUEST).images[0].astype(np.int16)
    # A request at the warm-up's size runs the graphs compiled at start-up: nothing new is compiled.
    assert counters["stats"]["unique_graphs"] == compiled_at_start
    assert np.abs(ours - theirs).max() <= 1
    torch._dynamo.reset()


@pytest.mark.slow  # dynamo's capture of the blocks and the decoder at two sizes, then four generations
def test_two_warm_up_sizes_leave_no_size_to_compile_at_request_time(data_dir: Path, tiny_dir: Path) -> None:
    """Two warm-up sizes that differ in both sides make dynamo compile shape-generic graphs at
    start-up, so a request at any size (listed or not) compiles nothing."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    fast = load_runtime(
        Settings(
            data_dir=data_dir,
            model={"id": "tiny", "dtype": "fp32"},
            performance={"compile": True, "compile_backend": "eager", "warmup_sizes": ["512", "768x640"]},
        )
    )
    assert isinstance(fast.generator, SD3Generator)
    compiled_at_start = counters["stats"]["unique_graphs"]
    assert compiled_at_start > 0
    for width, height in ((512, 512), (768, 640), (640, 768), (1024, 512)):
        request = GenerationRequest(prompt="a kite", seed=1, width=width, height=height, steps=2)
        fast.generator.generate(request)
        assert counters["stats"]["unique_graphs"] == compiled_at_start, (width, height)
    torch._dynamo.reset()


def test_warm_up_sizes_are_read_as_the_api_bounds_them() -> None:
    performance = Settings(performance={"warmup_sizes": ["768", " 1344X768 "]}).performance
    assert performance.warmup_sizes == ["768x768", "1344x768"]
    assert performance.warmup_shapes == [(768, 768), (1344, 768)]
    assert Settings().performance.warmup_shapes == [(1024, 1024)]  # the hosted page's default size
    for bad in ("256", "1024x1020x8", "1023x1024", "4096x1024", "wide", "x1024", ""):
        with pytest.raises(ValidationError, match="warmup_sizes"):
            Settings(performance={"warmup_sizes": [bad]})


@pytest.mark.slow  # dynamo's capture of one block, then a generation and a cached one
def test_blocks_are_compiled_in_place_and_the_step_cache_runs_them(data_dir: Path, tiny_dir: Path) -> None:
    from dataclasses import replace

    plain = load_runtime(Settings(data_dir=data_dir, model={"id": "tiny", "dtype": "fp32"}))
    fast = load_runtime(
        Settings(
            data_dir=data_dir,
            model={"id": "tiny", "dtype": "fp32"},
            performance={"compile": True, "compile_backend": "eager", "warmup": False},
        )
    )
    transformer = fast.generator.pipe.transformer  # type: ignore[attr-defined]
    assert not hasattr(transformer, "_orig_mod")  # the model itself stays a plain module ...
    blocks = list(transformer.transformer_blocks)
    assert all(block._compiled_call_impl is not None for block in blocks)  # ... its blocks compiled
    for request in (REQUEST, replace(REQUEST, step_cache="fast")):
        ours = plain.generator.generate(request).images[0].astype(np.int16)  # type: ignore[attr-defined]
        theirs = fast.generator.generate(request).images[0].astype(np.int16)  # type: ignore[attr-defined]
        assert np.abs(ours - theirs).max() <= 1
    torch._dynamo.reset()


def test_compile_and_fused_qkv_default_to_on_only_for_a_cuda_device_holding_the_weights() -> None:
    cuda, cpu, mps = torch.device("cuda", 0), torch.device("cpu"), torch.device("mps")
    assert on_by_default(None, device=cuda, resident=True)
    assert not on_by_default(None, device=cuda, resident=False)  # offload hooks move weights mid-forward
    assert not on_by_default(None, device=cpu, resident=True)
    assert not on_by_default(None, device=mps, resident=True)
    assert not on_by_default(False, device=cuda, resident=True)  # --no-compile
    assert on_by_default(True, device=cpu, resident=False)  # asked for: done


def test_inductor_keeps_its_code_where_a_restart_finds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert keep_compiled_code_in(tmp_path / "cache") == tmp_path / "cache"
    assert (tmp_path / "cache").is_dir() and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "users"))
    assert keep_compiled_code_in(tmp_path / "cache") == tmp_path / "users"  # the user's choice wins


def test_a_default_cpu_server_compiles_nothing(runtime: object) -> None:
    # The exact path by default here: no compiled module, no fused projection.
    assert runtime.generator.pipe.vae.decoder._compiled_call_impl is None  # type: ignore[attr-defined]
    transformer = runtime.generator.pipe.transformer  # type: ignore[attr-defined]
    assert not hasattr(transformer, "_orig_mod")
    assert all(block._compiled_call_impl is None for block in transformer.transformer_blocks)
    assert not transformer.transformer_blocks[0].attn.fused_projections
