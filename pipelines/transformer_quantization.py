"""The transformer's linear layers quantized by torchao, opt-in: `--quantize int8|fp8`.

- `int8`: int8 weights with per-channel scales, and activations quantized to int8 per token at run
  time (torchao's `Int8DynamicActivationInt8WeightConfig`): half the fp16 weight memory, on CUDA and
  on the CPU. A CPU multiplies int8 fast only with VNNI or AMX; elsewhere PyTorch's fallback int8
  matmul is two orders of magnitude slower than fp32, which start-up says (`quantization_caveat`).
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

from typing import Any

import torch

from pipelines.loading import cpu_has_int8_dot_products
from pipelines.options import Placement, TransformerQuant

MIN_TORCHAO = "0.18"
FP8_CAPABILITY = (8, 9)


def quantization_problem(mode: TransformerQuant, *, device: torch.device, placement: Placement) -> str | None:
    """Why `mode` cannot run here, as a sentence for the user; None when it can (or is "off")."""
    if mode == "off":
        return None
    try:
        import torchao
    except ImportError as exc:
        return f"--quantize {mode} needs torchao>={MIN_TORCHAO} ({exc}): pip install 'sd3-server[quant]'"
    from packaging.version import Version

    if Version(torchao.__version__.split("+")[0]) < Version(MIN_TORCHAO):
        return f"--quantize {mode} needs torchao>={MIN_TORCHAO}, found {torchao.__version__}"
    if placement != "device":
        return (
            f"--quantize {mode} keeps the transformer on the device, but the memory plan is {placement}: "
            "use --memory-mode device"
        )
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

    On an AVX2-only CPU `torch._int_mm`, which torchao's int8 layout calls, ran at 0.4 GFLOP/s against
    fp32's 69 (`benchmarks/cpu_matmul.py`), and the trained toy's image took 15.6x as long as in fp32
    (`benchmarks/speed_modes.py --model toy --size 256 --device cpu --modes exact int8`). Not refused:
    the weights still take half the memory, which may be what the user wants.
    """
    if mode != "int8" or device.type != "cpu":
        return None
    if cpu_has_int8_dot_products():
        return None
    return (
        "--quantize int8 on this CPU (no VNNI or AMX int8 instructions) runs PyTorch's fallback int8 "
        "matmul, many times slower than fp32 (15.6x the image time on an AVX2-only CPU): it saves "
        "memory, not time; --quantize off is faster here"
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


def quantize_transformer(transformer: Any, mode: TransformerQuant) -> int:
    """Convert the transformer blocks' linear layers in place; return how many were converted."""
    if mode == "off":
        return 0
    from torchao.quantization import quantize_

    converted = 0

    def in_a_block(module: torch.nn.Module, fqn: str) -> bool:
        nonlocal converted
        chosen = isinstance(module, torch.nn.Linear) and fqn.startswith("transformer_blocks.")
        converted += chosen
        return chosen

    # Called on the transformer (not on each block) so that the filter sees the blocks' full names.
    quantize_(transformer, _config(mode), filter_fn=in_a_block)
    return converted
