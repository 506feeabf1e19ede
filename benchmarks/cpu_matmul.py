"""How fast this CPU runs one T5-XXL feed-forward matmul, per dtype: what T5 on the CPU costs.

    python benchmarks/cpu_matmul.py [--repeats 5]
    python benchmarks/cpu_matmul.py --whole-t5      # and a whole random fp16 T5-XXL: ~10 GB, minutes

`--t5-on-cpu` encodes each new prompt with T5-XXL on the CPU. Its cost is dominated by matmuls of
this shape (77 tokens x 2 rows for CFG, d_model 4096, d_ff 10240), so the rates below, times
T5-XXL's ~0.715 TFLOP per 77-token prompt, estimate the encoding time. PyTorch's CPU speed per
dtype depends on the instruction set (fp16 and bf16 are fast only with AVX512-FP16/-BF16 or AMX,
int8 only with VNNI or AMX), which is why an fp16 T5 runs in bf16 only where the CPU has it, and
this script exists to check a machine. "fp16, multiplied in fp32" is what an fp16 T5 runs on a CPU
without native bf16 (`pipelines.memory.multiply_in_fp32`): its weights converted at each call.
The int8 × int8 row is the product torchao's `--quantize int8` runs in the transformer on a CPU
(`torch._int_mm`), the oneDNN row the layer it runs on an x86 CPU without VNNI or AMX instead
(pipelines/transformer_quantization.py). `--whole-t5` times one prompt through a whole fp16 T5-XXL with random
weights, as loaded and multiplying in fp32, and says how far apart the two encodings lie.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.memory import multiply_in_fp32  # noqa: E402
from pipelines.transformer_quantization import OneDnnInt8Linear, onednn_int8_available  # noqa: E402

TOKENS, D_MODEL, D_FF = 154, 4096, 10240
T5_XXL_TFLOP_PER_PROMPT = 0.715  # docs/performance.md §2: T5-XXL at 77 tokens


def rate(run: Callable[[], object], repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 2 * TOKENS * D_MODEL * D_FF / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--whole-t5",
        action="store_true",
        help="also encode one 77-token prompt with a random-weight fp16 T5-XXL (9.5 GB; minutes to build)",
    )
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    flags = ("avx512_bf16", "vnni", "amx_tile")  # PyTorch's cpuinfo checks, private: absent reads as no
    print(
        ", ".join(
            f"{flag}: {bool(getattr(torch.cpu, f'_is_{flag}_supported', lambda: False)())}" for flag in flags
        )
    )
    print(f"{'weights':<24} {'GFLOP/s':>9} {'s per 77-token T5-XXL prompt':>30}")
    rows: list[tuple[str, Callable[[], object]]] = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x, w = torch.randn(TOKENS, D_MODEL, dtype=dtype), torch.randn(D_FF, D_MODEL, dtype=dtype)
        rows.append((str(dtype).removeprefix("torch."), functools.partial(torch.nn.functional.linear, x, w)))
        if dtype == torch.float16:
            # What an fp16 T5 on a CPU without native bf16 runs: its fp16 weights converted at each call.
            layer = torch.nn.Linear(D_MODEL, D_FF, bias=False, dtype=dtype)
            layer.weight.data = w
            multiply_in_fp32(layer)
            rows.append(("fp16, multiplied in fp32", functools.partial(layer, x)))
    a8 = torch.randint(-128, 128, (TOKENS, D_MODEL), dtype=torch.int8)
    b8 = torch.randint(-128, 128, (D_MODEL, D_FF), dtype=torch.int8)
    rows.append(("int8 × int8 (_int_mm)", functools.partial(torch._int_mm, a8, b8)))
    if onednn_int8_available():
        # What `--quantize int8` runs on an x86 CPU without VNNI or AMX, the per-token quantization of
        # the activations included.
        layer32 = torch.nn.Linear(D_MODEL, D_FF, bias=False)
        rows.append(
            (
                "int8, oneDNN (7-bit w)",
                functools.partial(OneDnnInt8Linear(layer32), torch.randn(TOKENS, D_MODEL)),
            )
        )
    try:
        import bitsandbytes as bnb

        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        layer = bnb.nn.Linear8bitLt(D_MODEL, D_FF, bias=False, has_fp16_weights=False, threshold=6.0)
        layer.weight = bnb.nn.Int8Params(
            torch.randn(D_FF, D_MODEL), requires_grad=False, has_fp16_weights=False
        )
        layer = layer.to("cpu")  # quantizes
        x8 = torch.randn(TOKENS, D_MODEL)
        rows.append(("int8 (bitsandbytes)", lambda: layer(x8)))
    except ImportError:
        print("(bitsandbytes not installed: no int8 row)")
    with torch.inference_mode():
        for name, run in rows:
            gflops = rate(run, args.repeats)
            print(f"{name:<24} {gflops:9.0f} {T5_XXL_TFLOP_PER_PROMPT * 1000 / gflops:30.1f}")
    if args.whole_t5:
        whole_t5(args.repeats)


def whole_t5(repeats: int) -> None:
    """The seconds a whole fp16 T5-XXL takes per 77-token prompt, as loaded and as an fp16 T5 runs on
    a CPU without native bf16 (`multiply_in_fp32`), and how far apart the two encodings lie."""
    from pipelines.architectures import SD3_MEDIUM, build_t5

    started = time.perf_counter()
    t5 = build_t5(SD3_MEDIUM, device="cpu", dtype=torch.float16)
    print(f"T5-XXL, fp16, random weights: built in {time.perf_counter() - started:.0f} s")
    ids = torch.randint(0, t5.config.vocab_size, (1, 77), generator=torch.Generator().manual_seed(0))

    @torch.inference_mode()
    def encode(name: str) -> torch.Tensor:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            encoding = t5(ids).last_hidden_state.float()
            times.append(time.perf_counter() - started)
        print(f"{name:<24} {statistics.median(times):9.1f} s per prompt")
        return encoding

    first = encode("fp16 as loaded")
    multiply_in_fp32(t5)
    second = encode("fp16, multiplied in fp32")
    gap, largest = float((first - second).abs().max()), float(first.abs().max())
    print(f"largest difference between them {gap:.3g} (the largest value {largest:.3g})")


if __name__ == "__main__":
    main()
