"""Cached vs uncached prompt latency.

    python benchmarks/prompt_cache.py [--repeats 15] [--size 512] [--steps 10] [--data-dir DIR]

Two generators over the same loaded tiny SD3: the server's own (prompt cache on, the default
256 MB) and a second `SD3Generator` with `SamplingOptions(prompt_cache_bytes=0)`, which is what
`memory.prompt_cache_mb = 0` builds. The same request (the hosted page's prompt and negative
prompt, DPM++ 2M, CFG 5) runs on both, interleaved; the cached generator has seen the prompt once
before timing starts, so every timed call of it is a cache hit for both prompts. Prints the whole
call and the encode phase alone (`result.timings["encode"]`: both prompts) each way.

On the tiny model the three text encoders are a few small layers, so the absolute saving is small.
The saving that matters comes with real SD3, where T5-XXL (4.7 B parameters) costs ~5-15 s per
prompt on a CPU, or the 9.5 GB trip to the GPU under model offload (docs/performance.md §4).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

from server_overhead import machine_line, percentile
from tiny_latency import ORIGINAL

from pipelines.request import GenerationRequest
from pipelines.sd3 import SD3Generator
from server.config import Settings
from server.runtime import load_runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per generator (interleaved)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="sd3-bench-"))
    runtime = load_runtime(Settings(data_dir=data_dir, model={"id": "tiny"}))
    cached = runtime.generator
    assert isinstance(cached, SD3Generator)
    uncached = SD3Generator(cached.model, dataclasses.replace(cached.options, prompt_cache_bytes=0))

    job = GenerationRequest(
        prompt=str(ORIGINAL["prompt"]),
        negative_prompt=str(ORIGINAL["negative_prompt"]),
        scheduler="DPM++ 2M",
        steps=args.steps,
        guidance_scale=5.0,
        seed=int(ORIGINAL["seed"]),
        width=args.size,
        height=args.size,
    )
    # Warm-up: first-call allocations on both, and the cached generator's one miss per prompt.
    first = cached.generate(job)
    uncached.generate(job)
    misses_before = cached.prompt_cache.misses

    totals: dict[str, list[float]] = {"cache on (hit)": [], "cache off": []}
    encodes: dict[str, list[float]] = {name: [] for name in totals}
    contenders = {"cache on (hit)": cached, "cache off": uncached}
    for round_index in range(args.repeats):
        names = list(contenders) if round_index % 2 == 0 else list(contenders)[::-1]
        for name in names:
            t0 = time.perf_counter()
            result = contenders[name].generate(job)
            totals[name].append(time.perf_counter() - t0)
            encodes[name].append(result.timings["encode"])
    assert cached.prompt_cache.misses == misses_before, "a timed cached call missed the cache"

    print(machine_line())
    print(
        f"request: tiny SD3, {args.size}x{args.size}, {args.steps} steps, CFG 5, DPM++ 2M, the hosted page's"
        f" prompt and negative prompt; {args.repeats} interleaved calls per generator after 1 warm-up each"
    )
    print(
        f"cache: {len(cached.prompt_cache)} entries, {cached.prompt_cache.size_bytes / 1024:.0f} KiB"
        f" (fp32 tiny embeddings), {cached.prompt_cache.hits} hits / {cached.prompt_cache.misses} misses;"
        f" first (missing) call's encode {first.timings['encode'] * 1000:.2f} ms"
    )
    print(f"\n  {'generator':<15} {'total median s':>14} {'p90 s':>7} {'encode median ms':>16} {'p90 ms':>7}")
    for name in totals:
        print(
            f"  {name:<15} {statistics.median(totals[name]):14.3f} {percentile(totals[name], 0.9):7.3f}"
            f" {statistics.median(encodes[name]) * 1000:16.2f} {percentile(encodes[name], 0.9) * 1000:7.2f}"
        )
    on_total, off_total = (statistics.median(totals[n]) for n in totals)
    on_enc, off_enc = (statistics.median(encodes[n]) for n in encodes)
    saved_ms = (off_enc - on_enc) * 1000
    print(
        f"  encode saved by a hit: {saved_ms:.2f} ms ({off_enc / max(on_enc, 1e-9):.0f}x less),"
        f" {off_enc / off_total * 100:.1f} % of an uncached call"
    )
    print(f"  total cached / uncached: {on_total / off_total:.3f}")
    print(machine_line().replace("machine:", "at the end:"))
    print(
        "note: the tiny model's encoders are a few small layers, so the saving here is small in absolute"
        " terms; with real SD3 a hit skips T5-XXL, ~5-15 s on a CPU or a 9.5 GB transfer under offload"
        " (docs/performance.md §4)."
    )


if __name__ == "__main__":
    main()
