"""Every speed mode of the server on one request, as one table: time, speed-up, memory, and distance
from the exact image.

    python benchmarks/speed_modes.py                                  # a CUDA GPU: random SD3 Medium, 1024²
    python benchmarks/speed_modes.py --model toy --size 256 --device cpu --modes exact int8 cache-fast

Modes (`--modes`, default all):
- exact: the default loop with compilation and fused QKV off (`--no-compile --no-fuse-qkv`), and in
  fp32 on a CPU (the reference there: auto is bf16 on CPUs with native bf16);
- default: the server's defaults on this device (on CUDA: compiled per block + fused QKV; on a CPU
  with native bf16: bf16);
- compile-whole: the transformer compiled as one graph instead of per block;
- compile: `--compile` (per block), which only a CPU does not do by default;
- int8-compile: `--quantize int8` with `--compile`, on a CPU (on CUDA `int8` is already compiled);
- cudagraphs: the whole-graph compile replayed as CUDA graphs (`--compile-mode reduce-overhead`);
- any-size: the default compile warmed up at a second size as well, so that the request runs on
  dynamo's size-generic graphs (which then serve every size) rather than ones for its size alone;
- bf16: the weights and activations in bf16 (`--dtype bf16`; on a CPU, fast where it has native bf16);
- cudnn, fa3: `--attention` (auto already takes FlashAttention 4/3 where installed);
- int8, fp8: `--quantize` (with the device's default compilation);
- cache-fast, cache-faster: the request's `cache` field (with the device's default compilation).

Each mode loads its own runtime through the serving code (`server.runtime.load_runtime`), pays its
compile in the warm-up ("ready": the modes share one inductor cache, so a mode whose graphs an
earlier one compiled is ready sooner, as a restarted server is), generates the request once
untimed, then `--repeats` times; the table shows the median, its ratio to `exact`, the peak GPU
memory of the generations, and the PSNR of the image against exact's (∞: the same pixels). A mode
this machine cannot run says why.
The request is the hosted page's: DPM++ 2M, `--steps` 25, CFG 5, with a negative prompt.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.loading import ModelLoadError, resolve_device  # noqa: E402
from pipelines.request import GenerationRequest  # noqa: E402
from pipelines.toy.quality import psnr  # noqa: E402

ANY_SIZE = "the request's and another"
MODES: dict[str, tuple[dict[str, object], str]] = {
    # mode: (performance settings, the request's step cache). In the order a GPU run under a time
    # limit most needs them: issue 16's targets (the default exact path; fp8 and the step cache for
    # the opt-in one) first, then the alternatives to the default.
    "exact": ({"compile": False, "fuse_qkv": False}, "off"),
    "default": ({}, "off"),
    "fp8": ({"quantize": "fp8"}, "off"),
    "cache-fast": ({}, "fast"),
    "cache-faster": ({}, "faster"),
    "fa3": ({"attention": "fa3"}, "off"),
    # CUDA graphs (inductor's reduce-overhead mode) over the whole-graph compile: launches go away,
    # which pays where a step is short (small sizes, few steps); without autotuning's minutes.
    "cudagraphs": ({"compile_scope": "whole", "compile_mode": "reduce-overhead"}, "off"),
    "compile-whole": ({"compile_scope": "whole"}, "off"),
    "cudnn": ({"attention": "cudnn"}, "off"),
    "int8": ({"quantize": "int8"}, "off"),
    "bf16": ({"dtype": "bf16"}, "off"),
    # The default compile warmed up at a second size that differs in both sides: dynamo's
    # size-generic graphs then serve the request, as they serve every size after such a warm-up.
    "any-size": ({"warmup_sizes": ANY_SIZE}, "off"),
    # Compiled per block where the default is not to compile (a CPU): what --compile buys there.
    "compile": ({"compile": True}, "off"),
    # The same with the transformer in int8 (a CPU's oneDNN layers run eagerly between the graphs).
    "int8-compile": ({"quantize": "int8", "compile": True}, "off"),
}
# Modes that only differ from another where a device does not compile by default, with that mode.
CPU_ONLY = {"compile": "default", "int8-compile": "int8"}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_mode(args: argparse.Namespace, request: GenerationRequest, mode: str) -> dict[str, object]:
    from pipelines.sd3 import SD3Generator
    from server.config import Settings
    from server.runtime import load_runtime

    performance, step_cache = MODES[mode]
    device = resolve_device(args.device).type
    if mode in CPU_ONLY and device == "cuda":
        return {"mode": mode, "skipped": f"compiled per block by default here: see `{CPU_ONLY[mode]}`"}
    model = {"id": args.model, "device": args.device}
    side = max(args.size, 512)  # the setting's floor
    warmup_sizes = [f"{side}x{side}"]
    if performance.get("warmup_sizes") == ANY_SIZE:
        wider, taller = (side + 64, side + 128) if side + 128 <= 2048 else (side - 64, side - 128)
        warmup_sizes.append(f"{wider}x{taller}")
    if mode == "exact" and device == "cpu":
        model["dtype"] = "fp32"
    if "dtype" in performance:  # a model setting, not a performance one
        performance = dict(performance)
        model["dtype"] = str(performance.pop("dtype"))
    settings = Settings(
        data_dir=args.data_dir,
        model=model,
        performance={**performance, "warmup_sizes": warmup_sizes},
    )
    started = time.perf_counter()
    try:
        runtime = load_runtime(settings)
    except ModelLoadError as exc:
        return {"mode": mode, "skipped": str(exc)}
    ready = time.perf_counter() - started
    generator = runtime.generator
    assert isinstance(generator, SD3Generator)
    cuda = runtime.device.startswith("cuda")
    job = replace(request, step_cache=step_cache)
    # Untimed: on a GPU a process's first generation pays one-time set-up (cuBLAS handles, lazily
    # loaded kernels, the caching allocator's first blocks) that would otherwise fall on whichever
    # mode runs first, and with --repeats 2 the median is the mean of the two.
    generator.generate(job)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds, image, skipped = [], None, 0.0
    for _ in range(args.repeats):
        _sync(runtime.device)
        t0 = time.perf_counter()
        result = generator.generate(job)
        _sync(runtime.device)
        seconds.append(time.perf_counter() - t0)
        image, skipped = result.images[0], result.timings.get("cache_skipped", 0.0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else math.nan
    del runtime
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {
        "mode": mode,
        "ready": ready,
        "seconds": statistics.median(seconds),
        "peak": peak,
        "image": image,
        "skipped": skipped,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:sd3-medium")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="the data folder every mode shares (a new temporary one unless told), and with it the "
        "inductor cache: a mode whose graphs an earlier one compiled is ready sooner, as after a restart",
    )
    args = parser.parse_args()
    args.data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="sd3-speed-"))
    request = GenerationRequest(
        prompt="a lighthouse on a cliff at dusk, oil painting",
        negative_prompt="blurry, low quality",
        seed=1,
        width=args.size,
        height=args.size,
        steps=args.steps,
    )
    modes = args.modes if "exact" in args.modes else ["exact", *args.modes]
    print(f"## {args.model} at {args.size}², {args.steps} steps, DPM++ 2M, CFG 5 ({args.repeats} runs each)")
    header = ("ready s", "s/image", "× exact", "peak GiB", "PSNR dB", "skipped")
    print(f"{'mode':<14} " + " ".join(f"{h:>8}" for h in header), flush=True)
    exact: dict[str, object] = {}
    # A row as soon as its mode has run: under gpu_check.sh's time limit, the modes done still print.
    for mode in modes:
        try:
            row = run_mode(args, request, mode)
        except Exception as exc:  # noqa: BLE001 - one mode's failure (a kernel, a version) must not end the table
            if mode == "exact":
                raise
            first_line = (str(exc).splitlines() or [""])[0][:200]
            print(f"{mode:<14} failed: {type(exc).__name__}: {first_line}", flush=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        exact = exact or row
        if "skipped" in row and "seconds" not in row:
            print(f"{row['mode']:<14} skipped: {row['skipped']}", flush=True)
            continue
        speed_up = float(exact["seconds"]) / float(row["seconds"])  # type: ignore[arg-type]
        distance = psnr(np.asarray(row["image"]), np.asarray(exact["image"]))
        print(
            f"{row['mode']:<14} {row['ready']:>8.1f} {row['seconds']:>8.2f} {speed_up:>8.2f} "
            f"{row['peak']:>8.2f} {distance:>8.1f} {row['skipped']:>8.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
