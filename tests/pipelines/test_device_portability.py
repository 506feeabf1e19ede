"""What Apple's MPS backend refuses, checked on the CPU: no float64 tensor anywhere in a generation.

MPS has no float64 (docs/performance.md §8): a single double tensor moved to the device fails there.
ComfyUI's sampler math is float32 throughout and ours follows it; this test watches every op of
a whole generation, for every scheduler name the API accepts, and fails on the first float64
result, wherever it was made (CPU-side sigmas and noise are moved to the device too).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pipelines.request import GenerationRequest
from pipelines.sd3 import SD3Generator
from schedulers.names import public_names
from server.runtime import Runtime


class Float64Watch(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tree_flatten(out)[0]):
            self.ops.add(str(func))
        return out


# Every name, each under a dispatch mode that sees every tensor op: 10 to 25 s a name on a busy
# 2-core machine. The fast tier runs every name without the watch (test_txt2img_http.py).
@pytest.mark.slow
@pytest.mark.parametrize("scheduler", public_names())
def test_no_float64_tensor_in_a_generation(runtime: Runtime, scheduler: str) -> None:
    request = GenerationRequest(
        prompt="a (fox:1.2) in snow",
        negative_prompt="blur",
        seed=1,
        width=256,
        height=256,
        steps=4,
        scheduler=scheduler,
        cond_start=0.1,
    )
    assert isinstance(runtime.generator, SD3Generator)
    watch = Float64Watch()
    with watch:
        runtime.generator.generate(request)
    assert not watch.ops, f"float64 results from {sorted(watch.ops)}"
