"""Which int8 layout `--quantize int8` gives oneDNN's matmul on an x86 CPU, measured: each layout's
images of the trained toy against the exact fp32 ones.

    python benchmarks/int8_layouts.py                  # 16 pairs at 256 px: ~6 min on one core
    python benchmarks/int8_layouts.py --pairs 32 --size 512

Every layout runs `torch.ops.onednn.qlinear_pointwise` on the transformer blocks' linear layers, with
per-output-channel weight scales; they differ in the bits of the weights and of the activations and
in whether an activation scale is the token's own or one for the whole call:
- per token, weights ±63, activations ±127: the server's layer (`OneDnnInt8Linear`);
- per token, weights ±127, activations ±63: the other way to stay clear of `vpmaddubsw`'s saturating
  int16 sums on a CPU without VNNI (255 × 127 × 2 overflows it; 127 × 127 × 2 does not);
- per token, weights ±127, activations ±127: what a CPU with VNNI could run; it saturates without;
- per call, asymmetric u8 in [0, 127] or [0, 255], weights ±127: Inductor's own x86 recipe (PT2E's
  `X86InductorQuantizer`, dynamic: one scale and zero point per call; `reduce_range`, the 7-bit
  activations, is its advice for CPUs without VNNI).
The table gives, per layout, the PSNR of the error pooled over the pairs and the mean SSIM against the
exact fp32 image of the same pair, at the API's defaults (DPM++ 2M, 25 steps, CFG 5).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quality import DEFAULTS, load, table  # noqa: E402

from pipelines.loading import cpu_has_int8_dot_products  # noqa: E402
from pipelines.toy import quality  # noqa: E402
from pipelines.transformer_quantization import (  # noqa: E402
    OneDnnInt8Linear,
    onednn_int8_available,
    swap_in_int8_layers,
)


def per_token(weight_levels: int, activation_levels: int) -> type[OneDnnInt8Linear]:
    return type(
        "PerToken",
        (OneDnnInt8Linear,),
        {"WEIGHT_LEVELS": weight_levels, "ACTIVATION_LEVELS": activation_levels},
    )


class PerCall(OneDnnInt8Linear):
    """Inductor's dynamic x86 recipe: u8 activations over the call's [min, max] (0 always inside), one
    scale and zero point for every token; `QUANT_MAX` 127 with `reduce_range`, else 255."""

    WEIGHT_LEVELS = 127
    QUANT_MAX = 127
    EPS = 2**-12  # the quantizer's own floor on the scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        low, high = min(float(rows.min()), 0.0), max(float(rows.max()), 0.0)
        scale = max((high - low) / self.QUANT_MAX, self.EPS)
        zero_point = round(-low / scale)
        levels = torch.round(rows / scale).add_(zero_point).clamp_(0, self.QUANT_MAX).to(torch.uint8)
        out = torch.ops.onednn.qlinear_pointwise(
            levels, scale, zero_point,
            self.packed_weight, self.weight_scale, self.weight_zero_point,
            self.bias, 1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class PerCallFullRange(PerCall):
    QUANT_MAX = 255


LAYOUTS: dict[str, type[OneDnnInt8Linear]] = {
    "per token, weights ±63, activations ±127 (the server's)": OneDnnInt8Linear,
    "per token, weights ±127, activations ±63": per_token(127, 63),
    "per token, weights ±127, activations ±127": per_token(127, 127),
    "per call, u8 in [0, 127], weights ±127 (Inductor's, reduce_range)": PerCall,
    "per call, u8 in [0, 255], weights ±127 (Inductor's)": PerCallFullRange,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--pairs", type=int, default=16, help="prompt×seed pairs")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=4, help="which set of pairs")
    args = parser.parse_args()
    if not onednn_int8_available():
        sys.exit("this PyTorch has no oneDNN quantized linear (an x86 CPU build is needed)")
    print(f"VNNI or AMX on this CPU: {cpu_has_int8_dot_products()} (without them ±127 × ±127 saturates)")
    pairs = quality.prompt_seed_pairs(args.pairs, seed=args.seed)
    requests = [replace(DEFAULTS, prompt=c.text, seed=s, width=args.size, height=args.size) for c, s in pairs]
    exact = [load(args.model).generate(r).images[0] for r in requests]
    rows: list[list[object]] = []
    for label, layer in LAYOUTS.items():
        generator = load(args.model)
        swap_in_int8_layers(generator.pipe.transformer, layer)
        images = [generator.generate(r).images[0] for r in requests]
        ssim = float(np.mean([quality.ssim(a, b) for a, b in zip(images, exact, strict=True)]))
        rows.append([label, quality.mean_psnr(images, exact), ssim])
        print(f"{label}: {rows[-1][1]:.2f} dB", flush=True)
    print(f"## int8 layouts against the exact fp32 loop, {args.model}, {args.size} px, {len(pairs)} pairs")
    table(["layout", "PSNR (dB)", "SSIM"], rows)


if __name__ == "__main__":
    main()
