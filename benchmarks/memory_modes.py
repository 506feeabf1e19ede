"""Peak memory (and time) of one generation under each memory mode, each in a fresh process.

    python benchmarks/memory_modes.py                          # CPU: random:small at 1024² and 2048²
    python benchmarks/memory_modes.py --model random:sd3-medium --sizes 1024 2048   # on a GPU

Every mode runs in its own subprocess so that one mode's allocations cannot hide another's
peak. On a GPU the figure is `torch.cuda.max_memory_allocated` (what the blogs cited in
docs/performance.md §3 report); on a CPU it is the process's peak resident set (ru_maxrss), which
includes the Python runtime and the weights, so read the differences between rows. Offload
modes mean nothing on a CPU device (there is nowhere to offload to) and are skipped there; T5 in
8-bit runs on both (bitsandbytes ≥ 0.48 has CPU kernels).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The checkout's packages, also where it is not pip-installed (benchmarks/gpu_check.sh on a lent GPU).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The reference first, then what lets SD3 Medium run on an 8 GB card (the offloads), which a GPU run
# under a time limit most needs; then the savers that keep every weight on the device.
MODES: dict[str, dict[str, str]] = {
    "everything on the device": {"mode": "device", "vae_tiling": "off", "attention_slicing": "off"},
    "model offload": {"mode": "model_offload", "vae_tiling": "on"},
    "model offload, T5 on the CPU": {"mode": "model_offload", "t5_on_cpu": "on", "vae_tiling": "on"},
    "sequential offload": {"mode": "sequential_offload", "vae_tiling": "on"},
    "T5 in 8-bit": {"mode": "device", "t5": "8bit", "vae_tiling": "off", "attention_slicing": "off"},
    "no T5": {"mode": "device", "t5": "off", "vae_tiling": "off", "attention_slicing": "off"},
    "VAE tiling": {"mode": "device", "vae_tiling": "on", "attention_slicing": "off"},
    "attention slicing": {"mode": "device", "vae_tiling": "off", "attention_slicing": "on"},
    "VAE tiling + attention slicing": {"mode": "device", "vae_tiling": "on", "attention_slicing": "on"},
}
# Meaningful only with a GPU: offloading needs a device to offload from.
OFFLOAD = {"model offload", "model offload, T5 on the CPU", "sequential offload"}


def child(model: str, memory: dict[str, str], size: int, steps: int, data_dir: str) -> None:
    import torch

    from pipelines.request import GenerationRequest
    from server.config import Settings
    from server.runtime import load_runtime

    settings = Settings(data_dir=Path(data_dir), model={"id": model}, memory=memory)
    runtime = load_runtime(settings)
    after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    runtime.generator.generate(  # type: ignore[attr-defined]
        GenerationRequest(prompt="a lighthouse at dusk", seed=1, width=size, height=size, steps=steps)
    )
    seconds = time.perf_counter() - started
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = {"seconds": seconds, "rss_after_load": after_load, "rss_peak": peak_rss}
    if cuda:
        report["gpu_peak"] = torch.cuda.max_memory_allocated()
    print("RESULT " + json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="random:small")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    data_dir = tempfile.mkdtemp(prefix="sd3-mem-")
    if args.child:
        spec = json.loads(args.child)
        child(spec["model"], spec["memory"], spec["size"], spec["steps"], data_dir)
        return

    import torch

    gpu = torch.cuda.is_available()
    unit = "GPU peak (GiB)" if gpu else "CPU peak RSS (GiB)"
    print(f"model {args.model}, {args.steps} steps, CFG 5, device {'cuda' if gpu else 'cpu'}")
    # Each row flushed as it lands: under gpu_check.sh's time limit, the rows done still print.
    print(f"{'mode':<32} {'size':>6} {unit:>20} {'RSS after load':>16} {'seconds':>9}", flush=True)
    for size in args.sizes:
        for name, memory in MODES.items():
            if name in OFFLOAD and not gpu:
                continue
            spec = {"model": args.model, "memory": memory, "size": size, "steps": args.steps}
            done = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True
            )
            line = next((row for row in done.stdout.splitlines() if row.startswith("RESULT ")), None)
            if line is None:
                failure = (done.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"{name:<32} {size:>6} {'failed: ' + failure[:60]:>20}", flush=True)
                continue
            result = json.loads(line.removeprefix("RESULT "))
            peak = result.get("gpu_peak", result["rss_peak"]) / 2**30
            print(
                f"{name:<32} {size:>6} {peak:>20.2f} {result['rss_after_load'] / 2**30:>16.2f} "
                f"{result['seconds']:>9.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
