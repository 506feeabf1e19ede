"""`--quantize int8|fp8`: the transformer blocks' linear layers through torchao or oneDNN, run for real
on the CPU (int8; fp8 needs a GPU and is refused here with a reason). How far images move on a trained
model is benchmarks/quality.py's to measure; here the tiny model shows the layers are converted and
used, by each int8 kernel whatever this CPU would choose."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import transformer_quantization
from pipelines.loading import ModelLoadError, resolve_device
from pipelines.request import GenerationRequest
from pipelines.transformer_quantization import (
    OneDnnInt8Linear,
    int8_kernel,
    onednn_int8_available,
    quantization_caveat,
    quantization_problem,
)
from server.config import Settings
from server.runtime import load_runtime

pytest.importorskip("torchao", reason="the test extra installs torchao")

REQUEST = GenerationRequest(prompt="a lighthouse", seed=4, width=128, height=128, steps=8)
CPU = torch.device("cpu")
needs_onednn = pytest.mark.skipif(not onednn_int8_available(), reason="oneDNN's int8 ops are x86 only")


@pytest.fixture(params=["torchao", "onednn"])
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each int8 kernel in turn, as this CPU's choice: the instructions decide which one a CPU gets."""
    if request.param == "onednn" and (not onednn_int8_available() or resolve_device("auto") != CPU):
        pytest.skip("oneDNN's int8 kernel is for x86 CPUs, and the runtimes here load on the default device")
    monkeypatch.setattr(
        transformer_quantization, "cpu_has_int8_dot_products", lambda: request.param == "torchao"
    )
    assert int8_kernel(CPU) == request.param
    return str(request.param)


def _runtime(data_dir: Path, **performance: object) -> object:
    return load_runtime(
        Settings(data_dir=data_dir, model={"id": "tiny", "dtype": "fp32"}, performance=performance)
    )


def test_int8_converts_every_linear_layer_of_the_blocks_and_only_those(
    data_dir: Path, runtime: object, kernel: str
) -> None:
    transformer_before = runtime.generator.pipe.transformer  # type: ignore[attr-defined]  # the same tiny, exact
    in_blocks = [m for m in transformer_before.transformer_blocks.modules() if isinstance(m, torch.nn.Linear)]
    runtime = _runtime(data_dir, quantize="int8")
    transformer = runtime.generator.pipe.transformer  # type: ignore[attr-defined]
    assert f"transformer in int8 ({len(in_blocks)} layers)" in runtime.description  # type: ignore[attr-defined]
    converted: list[torch.nn.Module]
    if kernel == "torchao":
        converted = [m for m in transformer.transformer_blocks.modules() if isinstance(m, torch.nn.Linear)]
        assert {type(m.weight).__name__ for m in converted} == {"Int8Tensor"}  # torchao's int8 layout
    else:
        converted = [m for m in transformer.transformer_blocks.modules() if isinstance(m, OneDnnInt8Linear)]
        assert not any(isinstance(m, torch.nn.Linear) for m in transformer.transformer_blocks.modules())
    assert len(converted) == len(in_blocks)
    # Outside the blocks: as loaded.
    assert type(transformer.proj_out) is torch.nn.Linear
    assert type(transformer.proj_out.weight) is torch.nn.Parameter
    assert transformer.proj_out.weight.dtype == torch.float32


def test_int8_stays_near_the_exact_image(data_dir: Path, runtime: object, kernel: str) -> None:
    exact = runtime.generator.generate(REQUEST).images[0].astype(np.int16)  # type: ignore[attr-defined]
    int8 = _runtime(data_dir, quantize="int8").generator.generate(REQUEST).images[0].astype(np.int16)  # type: ignore[attr-defined]
    difference = np.abs(int8 - exact)
    assert 0 < difference.mean() < 1, difference.mean()  # converted (not the same), yet close


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_int8_linear_is_within_torchaos_error_of_the_exact_layer(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(256, 384).to(dtype)
    x = torch.randn(2, 77, 256, generator=generator).to(dtype)
    # Tokens of very different sizes: each gets its own activation scale.
    x[0, :10] *= 50
    exact = linear(x).float()
    out = OneDnnInt8Linear(linear)(x)
    assert out.shape == exact.shape and out.dtype == dtype
    error = (out.float() - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert error.max() < 0.03, error.max()


@needs_onednn
def test_onednn_int8_products_do_not_saturate_on_cpus_without_vnni() -> None:
    # Every activation and weight at its largest, one sign: 8-bit weights would have each pair of
    # u8 x s8 products overflow AVX2's int16 sums (255 x 127 x 2 > 32767); 7-bit ones cannot.
    linear = torch.nn.Linear(512, 64, bias=False)
    with torch.no_grad():
        linear.weight.fill_(0.01)
    x = torch.full((4, 512), 3.0)
    exact = linear(x)
    torch.testing.assert_close(OneDnnInt8Linear(linear)(x), exact, rtol=1e-3, atol=0)


@needs_onednn
def test_onednn_int8_layers_run_eagerly_inside_a_compiled_model() -> None:
    # Inductor cannot lower oneDNN's op on weights it did not pack itself; `--compile` must still work.
    int8 = OneDnnInt8Linear(torch.nn.Linear(64, 32))
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), int8)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-5)


def test_the_int8_kernel_is_chosen_from_the_cpus_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transformer_quantization, "cpu_has_int8_dot_products", lambda: True)
    assert int8_kernel(CPU) == "torchao"
    monkeypatch.setattr(transformer_quantization, "cpu_has_int8_dot_products", lambda: False)
    assert int8_kernel(CPU) == ("onednn" if onednn_int8_available() else "torchao")
    assert int8_kernel(torch.device("cuda")) == "torchao"
    monkeypatch.setattr(transformer_quantization, "onednn_int8_available", lambda: False)
    assert int8_kernel(CPU) == "torchao"


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
    monkeypatch.setattr(transformer_quantization, "cpu_has_int8_dot_products", lambda: True)
    problem = quantization_problem("int8", device=CPU, placement="device")
    assert problem is not None and "pip install 'sd3-server[quant]'" in problem
    # oneDNN's kernel is PyTorch's own: where the CPU gets it, torchao is not needed.
    monkeypatch.setattr(transformer_quantization, "cpu_has_int8_dot_products", lambda: False)
    monkeypatch.setattr(transformer_quantization, "onednn_int8_available", lambda: True)
    assert quantization_problem("int8", device=CPU, placement="device") is None


def test_the_server_refuses_before_loading(data_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="--quantize fp8 needs a CUDA GPU"):
        load_runtime(
            Settings(data_dir=data_dir, model={"id": "/nonexistent/weights"}, performance={"quantize": "fp8"})
        )


def test_int8_on_a_cpu_without_int8_instructions_is_said_to_be_slow_only_without_onednn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(transformer_quantization, "cpu_has_int8_dot_products", lambda: False)
    monkeypatch.setattr(transformer_quantization, "onednn_int8_available", lambda: False)
    slow = quantization_caveat("int8", device=CPU)
    assert slow is not None and "saves memory, not time" in slow
    for mode in ("off", "fp8"):
        assert quantization_caveat(mode, device=CPU) is None
    assert quantization_caveat("int8", device=torch.device("cuda")) is None
    monkeypatch.setattr(transformer_quantization, "onednn_int8_available", lambda: True)
    assert quantization_caveat("int8", device=CPU) is None  # oneDNN's kernel
    monkeypatch.setattr(transformer_quantization, "cpu_has_int8_dot_products", lambda: True)
    assert quantization_caveat("int8", device=CPU) is None


@pytest.mark.parametrize("slow", [False, True])
def test_start_up_says_when_int8_is_slow_on_this_cpu(
    data_dir: Path,
    tiny_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    slow: bool,
) -> None:
    monkeypatch.setattr(transformer_quantization, "cpu_has_int8_dot_products", lambda: False)
    if not slow and not onednn_int8_available():
        pytest.skip("oneDNN's int8 ops are x86 only")
    if slow:
        monkeypatch.setattr(transformer_quantization, "onednn_int8_available", lambda: False)
    with caplog.at_level("WARNING", logger="server.runtime"):
        runtime = _runtime(data_dir, quantize="int8")
    said = "slow here: this CPU has no int8 instructions" in runtime.description  # type: ignore[attr-defined]
    warned = any("saves memory, not time" in record.getMessage() for record in caplog.records)
    assert said == warned == slow
