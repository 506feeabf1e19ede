"""`--quantize int8|fp8`: the transformer blocks' linear layers through torchao, run for real on the CPU
(int8; fp8 needs a GPU and is refused here with a reason). How far images move on a trained model is
benchmarks/quality.py's to measure; here the tiny model shows the layers are converted and used."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import transformer_quantization
from pipelines.loading import ModelLoadError
from pipelines.request import GenerationRequest
from pipelines.transformer_quantization import quantization_caveat, quantization_problem
from server.config import Settings
from server.runtime import load_runtime

pytest.importorskip("torchao", reason="the test extra installs torchao")

REQUEST = GenerationRequest(prompt="a lighthouse", seed=4, width=128, height=128, steps=8)
CPU = torch.device("cpu")


def _runtime(data_dir: Path, **performance: object) -> object:
    return load_runtime(
        Settings(data_dir=data_dir, model={"id": "tiny", "dtype": "fp32"}, performance=performance)
    )


def test_int8_converts_every_linear_layer_of_the_blocks_and_only_those(
    data_dir: Path, tiny_dir: Path
) -> None:
    runtime = _runtime(data_dir, quantize="int8")
    transformer = runtime.generator.pipe.transformer  # type: ignore[attr-defined]
    in_blocks = [m for m in transformer.transformer_blocks.modules() if isinstance(m, torch.nn.Linear)]
    assert f"transformer in int8 ({len(in_blocks)} layers)" in runtime.description  # type: ignore[attr-defined]
    assert {type(m.weight).__name__ for m in in_blocks} == {"Int8Tensor"}  # torchao's int8 layout
    # Outside the blocks: as loaded.
    assert type(transformer.proj_out.weight) is torch.nn.Parameter
    assert transformer.proj_out.weight.dtype == torch.float32


def test_int8_stays_near_the_exact_image(data_dir: Path, runtime: object) -> None:
    exact = runtime.generator.generate(REQUEST).images[0].astype(np.int16)  # type: ignore[attr-defined]
    int8 = _runtime(data_dir, quantize="int8").generator.generate(REQUEST).images[0].astype(np.int16)  # type: ignore[attr-defined]
    difference = np.abs(int8 - exact)
    assert 0 < difference.mean() < 1, difference.mean()  # converted (not the same), yet close


@pytest.mark.parametrize(
    ("mode", "placement", "fragment"),
    [
        ("fp8", "device", "needs a CUDA GPU with fp8 tensor cores, not cpu"),
        ("int8", "sequential_offload", "use --memory-mode device"),
        ("int8", "model_offload", "use --memory-mode device"),
    ],
)
def test_what_cannot_run_here_says_why(mode: str, placement: str, fragment: str) -> None:
    problem = quantization_problem(mode, device=CPU, placement=placement)  # type: ignore[arg-type]
    assert problem is not None and fragment in problem
    assert quantization_problem("off", device=CPU, placement=placement) is None  # type: ignore[arg-type]
    assert quantization_problem("int8", device=CPU, placement="device") is None


def test_without_torchao_the_reason_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao raises ImportError
    problem = quantization_problem("int8", device=CPU, placement="device")
    assert problem is not None and "pip install 'sd3-server[quant]'" in problem


def test_the_server_refuses_before_loading(data_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="--quantize fp8 needs a CUDA GPU"):
        load_runtime(
            Settings(data_dir=data_dir, model={"id": "/nonexistent/weights"}, performance={"quantize": "fp8"})
        )


def test_int8_on_a_cpu_without_int8_instructions_is_run_but_said_to_be_slow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(transformer_quantization, "cpu_has_int8_dot_products", lambda: False)
    slow = quantization_caveat("int8", device=CPU)
    assert slow is not None and "saves memory, not time" in slow
    for mode in ("off", "fp8"):
        assert quantization_caveat(mode, device=CPU) is None
    assert quantization_caveat("int8", device=torch.device("cuda")) is None
    monkeypatch.setattr(transformer_quantization, "cpu_has_int8_dot_products", lambda: True)
    assert quantization_caveat("int8", device=CPU) is None


@pytest.mark.parametrize("has_instructions", [False, True])
def test_start_up_says_when_int8_is_slow_on_this_cpu(
    data_dir: Path,
    tiny_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    has_instructions: bool,
) -> None:
    monkeypatch.setattr(transformer_quantization, "cpu_has_int8_dot_products", lambda: has_instructions)
    with caplog.at_level("WARNING", logger="server.runtime"):
        runtime = _runtime(data_dir, quantize="int8")
    said = "slow here: this CPU has no int8 instructions" in runtime.description  # type: ignore[attr-defined]
    warned = any("saves memory, not time" in record.getMessage() for record in caplog.records)
    assert said == warned == (not has_instructions)
