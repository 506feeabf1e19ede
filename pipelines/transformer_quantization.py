"""The transformer's linear layers quantized, opt-in: `--quantize int8|fp8`.

- `int8`: int8 weights with per-channel scales, and activations quantized to int8 per token at run
  time: half the fp16 weight memory, on CUDA and on the CPU. The kernel depends on the device
  (`int8_kernel`):
  - torchao's `Int8DynamicActivationInt8WeightConfig` on CUDA, and on a CPU with VNNI or AMX;
  - oneDNN's quantized linear (`OneDnnInt8Linear`, below) on an x86 CPU without them, where
    torchao's int8 matmul (`torch._int_mm`'s fallback) ran two orders of magnitude slower than fp32
    and oneDNN's runs faster than fp32;
  - torchao's anyway where neither fits (a CPU build of PyTorch without oneDNN), which start-up
    says is slow (`quantization_caveat`).
- `fp8`: e4m3 weights and activations with per-row scales (`Float8DynamicActivationFloat8WeightConfig`,
  `PerRow`): needs a GPU with fp8 tensor cores (compute capability 8.9: Ada, Hopper, Blackwell).

Only the linear layers inside the transformer blocks are converted, where nearly all of the
arithmetic is; the patch and time embedders and the final projection stay as loaded. The result is
an approximation of the exact image: `benchmarks/quality.py` measures how far it moves.

torchao's layouts are not moved by accelerate's offload hooks, so quantization asks for the
weights to stay on the device (`--memory-mode device`); it runs before `torch.compile`, which on
CUDA fuses the quantize steps into the matmuls.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any, Literal

import torch

from pipelines.loading import cpu_has_int8_dot_products
from pipelines.options import Placement, TransformerQuant

MIN_TORCHAO = "0.18"
FP8_CAPABILITY = (8, 9)

Int8Kernel = Literal["torchao", "onednn"]


def onednn_int8_available() -> bool:
    """Whether this PyTorch has oneDNN's quantized linear for x86 CPUs (the ops Inductor lowers to)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


def int8_kernel(device: torch.device) -> Int8Kernel:
    """Which int8 matmul `--quantize int8` runs on `device` (the module docstring says why)."""
    if device.type == "cpu" and not cpu_has_int8_dot_products() and onednn_int8_available():
        return "onednn"
    return "torchao"


class OneDnnInt8Linear(torch.nn.Module):
    """A linear layer as oneDNN's int8 matmul, with torchao's int8 granularity: symmetric scales per
    output channel for the weights and per token for the activations.

    The weights use 7 bits (±63), not 8. Without VNNI, x86 multiplies u8 by s8 with `vpmaddubsw`,
    which adds each pair of products into a saturating int16: 255 × 127 × 2 overflows it, 255 × 63 × 2
    does not. On an SD3-width feed-forward (1536 → 6144 → 1536, 2356 tokens) 8-bit weights were 20 %
    off the fp32 output on an AVX2-only EPYC, 7-bit ones 2.0 % (torchao's int8: 1.7 %). Of the ways to
    stay clear of it, 7-bit weights cost the least on the trained toy: 33.7 dB from the fp32 image,
    against 32.1 dB with 7-bit activations instead and 31.4 dB for Inductor's own x86 recipe (one
    activation scale per call; `benchmarks/int8_layouts.py`).

    oneDNN takes one activation scale per call, so each token is divided by its own absolute maximum
    first and the output rows multiplied back by it: the matmul is linear in each row.
    """

    WEIGHT_LEVELS = 63
    ACTIVATION_LEVELS = 127

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        self.out_features, self.in_features = weight.shape
        scale = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / self.WEIGHT_LEVELS
        levels = torch.round(weight / scale[:, None]).clamp(-self.WEIGHT_LEVELS, self.WEIGHT_LEVELS)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", torch.zeros(self.out_features, dtype=torch.int64))
        # oneDNN's own blocked layout, packed once (an opaque tensor, so not a buffer: it stays on the CPU).
        self.packed_weight = torch.ops.onednn.qlinear_prepack(levels.to(torch.int8), None)
        self.bias = linear.bias

    # Inductor lowers this op only for weights it packed itself (with freezing): under `--compile` the
    # layer runs eagerly between the compiled graphs instead of failing the compile.
    @torch.compiler.disable  # type: ignore[untyped-decorator]  # torch's decorator is untyped
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        peak = rows.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        # Symmetric levels stored as u8 around the zero point 128 (oneDNN's activations are u8 on x86).
        zero_point = self.ACTIVATION_LEVELS + 1
        levels = torch.round(rows * (self.ACTIVATION_LEVELS / peak)).add_(zero_point).to(torch.uint8)
        out = torch.ops.onednn.qlinear_pointwise(
            levels, 1 / self.ACTIVATION_LEVELS, zero_point,
            self.packed_weight, self.weight_scale, self.weight_zero_point,
            None, 1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        out = out.mul_(peak)
        if self.bias is not None:
            out = out.add_(self.bias)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def quantization_problem(mode: TransformerQuant, *, device: torch.device, placement: Placement) -> str | None:
    """Why `mode` cannot run here, as a sentence for the user; None when it can (or is "off")."""
    if mode == "off":
        return None
    if placement != "device":
        return (
            f"--quantize {mode} keeps the transformer on the device, but the memory plan is {placement}: "
            "use --memory-mode device"
        )
    if mode == "int8" and int8_kernel(device) == "onednn":
        return None  # PyTorch's own oneDNN ops: no torchao needed
    try:
        import torchao
    except ImportError as exc:
        return f"--quantize {mode} needs torchao>={MIN_TORCHAO} ({exc}): pip install 'sd3-server[quant]'"
    from packaging.version import Version

    if Version(torchao.__version__.split("+")[0]) < Version(MIN_TORCHAO):
        return f"--quantize {mode} needs torchao>={MIN_TORCHAO}, found {torchao.__version__}"
    if mode == "fp8":
        if device.type != "cuda":
            return f"--quantize fp8 needs a CUDA GPU with fp8 tensor cores, not {device.type}: use int8"
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_CAPABILITY:
            return (
                f"--quantize fp8 needs compute capability 8.9 or newer (Ada, Hopper, Blackwell); this GPU "
                f"has {capability[0]}.{capability[1]}: use int8"
            )
    return None


def quantization_caveat(mode: TransformerQuant, *, device: torch.device) -> str | None:
    """A sentence for the start-up log where `mode` runs but costs time here; None where it does not.

    Only torchao's int8 on a CPU without VNNI or AMX, which is left only where oneDNN's kernel is
    missing too: there `torch._int_mm` ran at 0.4 GFLOP/s against fp32's 69 on an AVX2-only EPYC
    (`benchmarks/cpu_matmul.py`), and the trained toy's image took 15.6x as long as in fp32. Not
    refused: the weights still take half the memory, which may be what the user wants.
    """
    if mode != "int8" or device.type != "cpu" or cpu_has_int8_dot_products() or onednn_int8_available():
        return None
    return (
        "--quantize int8 on this CPU (no VNNI or AMX int8 instructions, and no oneDNN in this PyTorch) "
        "runs PyTorch's fallback int8 matmul, many times slower than fp32 (15.6x the image time on an "
        "AVX2-only CPU): it saves memory, not time; --quantize off is faster here"
    )


def _config(mode: TransformerQuant) -> Any:
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        PerRow,
    )

    if mode == "fp8":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    return Int8DynamicActivationInt8WeightConfig()


def _in_a_block(fqn: str) -> bool:
    """Whether a module's full name puts it inside one of the transformer blocks."""
    return fqn.startswith("transformer_blocks.")


def quantize_transformer(transformer: Any, mode: TransformerQuant, *, device: torch.device) -> int:
    """Convert the transformer blocks' linear layers in place; return how many were converted."""
    if mode == "off":
        return 0
    if mode == "int8" and int8_kernel(device) == "onednn":
        return swap_in_int8_layers(transformer)
    from torchao.quantization import quantize_

    converted = 0

    def chosen(module: torch.nn.Module, fqn: str) -> bool:
        nonlocal converted
        picked = isinstance(module, torch.nn.Linear) and _in_a_block(fqn)
        converted += picked
        return picked

    # Called on the transformer (not on each block) so that the filter sees the blocks' full names.
    quantize_(transformer, _config(mode), filter_fn=chosen)
    return converted


def swap_in_int8_layers(
    transformer: torch.nn.Module, layer: Callable[[torch.nn.Linear], torch.nn.Module] = OneDnnInt8Linear
) -> int:
    """Replace the blocks' linear layers with `layer(linear)`; return how many. The layer is a parameter
    so that `benchmarks/int8_layouts.py` can set other int8 layouts beside this one."""
    linears = [
        (name, module)
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and _in_a_block(name)
    ]
    for name, module in linears:
        parent_name, _, attribute = name.rpartition(".")
        setattr(transformer.get_submodule(parent_name), attribute, layer(module))
    return len(linears)
