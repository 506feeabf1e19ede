"""T5-XXL in 8-bit (bitsandbytes LLM.int8) for the sources that do not come as a diffusers folder.

A diffusers folder or Hub id is quantized by transformers itself while loading
(`pipelines.loading._t5_in_8bit`), which never holds the fp16 T5 in memory. A single-file
checkpoint and a random-weight architecture arrive as a built fp16/fp32 T5 instead; this module
converts that one in place, with the same bitsandbytes layers and the same choices transformers
makes, so that all sources give the same 8-bit T5 from the same weights:

- every `nn.Linear` becomes a `bitsandbytes.nn.Linear8bitLt` (int8 weights, fp16 outlier columns
  above the 6.0 threshold, LLM.int8's default);
- the modules T5 keeps in full precision (`_keep_in_fp32_modules`: the feed-forward output `wo`,
  which overflows in fp16) are left as they are.

bitsandbytes quantizes a weight when it moves from the CPU to the target device, so each weight
takes that trip once: on a GPU the fp16 copy of each layer is freed as its int8 copy arrives.
bitsandbytes ≥ 0.48 runs LLM.int8 on the CPU too, where T5 in fp32 would otherwise take 19 GB of RAM.
"""

from __future__ import annotations

import torch

MIN_BITSANDBYTES = "0.48"


def bitsandbytes_problem() -> str | None:
    """Why T5 cannot be put in 8-bit here, as a sentence for the user; None when it can."""
    try:
        import bitsandbytes
    except Exception as exc:  # ImportError, or a CUDA set-up error raised at import
        return (
            f"T5 in 8-bit needs bitsandbytes>={MIN_BITSANDBYTES}, which could not be imported ({exc}): "
            f"pip install 'bitsandbytes>={MIN_BITSANDBYTES}'"
        )
    from packaging.version import Version

    if Version(bitsandbytes.__version__) < Version(MIN_BITSANDBYTES):
        # Older releases run LLM.int8 on CUDA only, and diffusers cannot offload their 8-bit modules.
        return (
            f"T5 in 8-bit needs bitsandbytes>={MIN_BITSANDBYTES}, found {bitsandbytes.__version__}: "
            f"pip install -U 'bitsandbytes>={MIN_BITSANDBYTES}'"
        )
    return None


def quantize_linear_8bit(model: torch.nn.Module, device: torch.device) -> None:
    """Swap `model`'s linear layers for LLM.int8 ones quantized onto `device`."""
    from bitsandbytes.nn import Int8Params, Linear8bitLt

    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear) or isinstance(child, Linear8bitLt) or name in keep:
                continue
            layer = Linear8bitLt(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                has_fp16_weights=False,  # inference only: keep int8 weights, not a trainable fp16 copy
                threshold=6.0,
                device="meta",  # the weights come from `child`; allocate nothing twice
            )
            # Int8Params quantizes on its way from the CPU to a device, not on a device-to-device copy.
            layer.weight = Int8Params(child.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data.to(device), requires_grad=False)
            setattr(parent, name, layer.to(device))
