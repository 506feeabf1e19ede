"""Optional speed-ups that change no result: fused QKV projections and `torch.compile`.

Both act on the transformer only, which does nearly all of an image's arithmetic (docs/performance.md §2).
SD3's transformer has no `_repeated_blocks` in diffusers 0.42.1, so it is compiled whole.
Compilation happens lazily at the first forward of each shape; `warm_up` runs one generation at
start-up so that a user's first request does not pay it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from pipelines.request import GenerationRequest

log = logging.getLogger(__name__)


def speed_up(pipe: Any, *, compile: bool, mode: str, backend: str, fuse_qkv: bool) -> None:
    if fuse_qkv:
        # One [3d x d] matmul instead of three; must happen before compiling.
        pipe.transformer.fuse_qkv_projections()
    if compile:
        pipe.transformer = torch.compile(pipe.transformer, mode=mode, backend=backend, fullgraph=False)


def warm_up(generator: Any, *, size: int) -> float:
    """Run one short generation at `size`² (both CFG branches) and return its seconds."""
    started = time.perf_counter()
    generator.generate(
        GenerationRequest(prompt="warm-up", negative_prompt="", seed=0, width=size, height=size, steps=2)
    )
    seconds = time.perf_counter() - started
    log.info("warm-up at %dx%d took %.1f s", size, size, seconds)
    return seconds
