"""Which kernel runs SD3's attention: PyTorch's own choice, cuDNN's, or FlashAttention 3/4 plugged into
PyTorch's SDPA dispatcher (`torch.nn.attention.activate_flash_attention_impl`).

SD3's attention processor calls `scaled_dot_product_attention`, so a kernel registered under SDPA
serves every transformer block without touching diffusers. FlashAttention 3 runs on Hopper (compute
capability 9.x) and comes from the `flash_attn_interface` module of flash-attn's `hopper/` build;
FlashAttention 4 on Hopper and Blackwell (9.x, 10.x) from `flash_attn.cute`. Neither is on PyPI as a
wheel for every platform, so "auto" takes one only where its module imports and the GPU is one it
supports, newest first, and otherwise leaves PyTorch's choice alone. `cudnn` prefers cuDNN's fused
attention by switching off PyTorch's flash and memory-efficient kernels (the math kernel stays as
the fallback for shapes cuDNN refuses). All of these compute exact attention: images change only
by float rounding.

The choice is process-wide (the dispatcher is global), made once at start-up.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from pipelines.options import AttentionChoice

log = logging.getLogger(__name__)

# Each FlashAttention build: the module PyTorch imports, and the GPU majors it runs on.
FLASH_IMPLS: dict[str, tuple[str, frozenset[int]]] = {
    "fa4": ("flash_attn.cute.interface", frozenset({9, 10})),
    "fa3": ("flash_attn_interface", frozenset({9})),
}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package
        return False


def pick(choice: AttentionChoice, *, cuda_major: int | None, importable: set[str]) -> tuple[str, str | None]:
    """(what runs, why not what was asked or None). A pure function of the hardware and the
    installed modules, so that every branch is testable without them."""
    if choice == "sdpa":
        return "sdpa", None
    if choice == "auto":
        for name, (module, majors) in FLASH_IMPLS.items():
            if cuda_major in majors and module in importable:
                return name, None
        return "sdpa", None
    if cuda_major is None:
        return "sdpa", f"--attention {choice} needs a CUDA GPU"
    if choice == "cudnn":
        return "cudnn", None
    module, majors = FLASH_IMPLS[choice]
    if cuda_major not in majors:
        supported = " or ".join(f"{m}.x" for m in sorted(majors))
        return (
            "sdpa",
            f"--attention {choice} needs compute capability {supported}, this GPU is {cuda_major}.x",
        )
    if module not in importable:
        return "sdpa", f"--attention {choice} needs the `{module}` module (a flash-attn build), not installed"
    return choice, None


def choose(choice: AttentionChoice, device: torch.device) -> tuple[str, str | None]:
    """`pick` for this machine."""
    major = torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else None
    modules = {module for module, _ in FLASH_IMPLS.values() if _importable(module)}
    return pick(choice, cuda_major=major, importable=modules)


def activate(kernel: str) -> None:
    """Make `kernel` (a result of `choose`) the one SDPA dispatches to."""
    if kernel in FLASH_IMPLS:
        torch.nn.attention.activate_flash_attention_impl(kernel.upper())
    elif kernel == "cudnn":
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(True)
    log.info("attention kernel: %s", kernel)
