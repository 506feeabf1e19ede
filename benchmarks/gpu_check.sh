#!/usr/bin/env bash
# The checks no CPU machine can do, as one script for a session that is lent a CUDA GPU
# (run it from the repository root after the README's set-up, with a CUDA build of torch and
# `pip install bitsandbytes`). Nothing is downloaded: the real SD3 Medium architecture is built
# with random weights on the GPU (--model random:sd3-medium).
#   0. the offload / 8-bit T5 / compile tests, run on the GPU (real host-to-device offloading);
#   1. latency and peak GPU memory per memory mode at 1024² and 2048² (offloads, T5 8-bit, tiling);
#   2. torch.compile (inductor) + fused QKV: warm-up time and latency against eager.
set -euo pipefail
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
SD3_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider \
    tests/pipelines/test_offload_and_quantization.py tests/pipelines/test_compilation.py || true
python benchmarks/memory_modes.py --model random:sd3-medium --sizes 1024 2048 --steps 4
python - <<'PY'
import time

import torch

from pipelines.request import GenerationRequest
from server.app import load_runtime
from server.config import Settings

request = GenerationRequest(prompt="a lighthouse at dusk", seed=1, width=1024, height=1024, steps=25)
for label, performance in (("eager", {}), ("compile + fused QKV", {"compile": True, "fuse_qkv": True})):
    started = time.perf_counter()
    runtime = load_runtime(Settings(model={"id": "random:sd3-medium"}, performance=performance))
    ready = time.perf_counter() - started
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        runtime.generator.generate(request)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    print(f"{label:<20} ready in {ready:6.1f} s; 1024², 25 steps, CFG 5: {sorted(times)[1]:.2f} s (median of 3)")
    del runtime
    torch.cuda.empty_cache()
PY
