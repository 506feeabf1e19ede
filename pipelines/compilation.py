"""Speed-ups that change no result beyond float rounding: `torch.compile`, and the rule that turns it
and fused QKV projections (`pipelines/joint_attention.py`) on by default.

Both act on the transformer, which does nearly all of an image's arithmetic (docs/performance.md §2);
compiling also compiles the VAE's decoder, and keeps inductor's compiled code in the data folder so
that a restart reuses it.
On CUDA with the weights resident they are on unless switched off (`--no-compile`, `--no-fuse-qkv`);
elsewhere off unless asked for: on a CPU or MPS a compile of minutes buys a few percent.

Compilation is regional by default: each `JointTransformerBlock` is compiled in place (diffusers'
`compile_repeated_blocks`), so the 24-38 identical blocks share one compiled graph (a compile of
seconds rather than minutes) and code that calls the blocks itself (the step cache) runs compiled too.
Compilation happens lazily at the first forward of each shape; `warm_up` runs a generation at
each of the configured sizes at start-up so that a user's first request does not pay it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from pipelines.options import CompileScope
from pipelines.request import GenerationRequest

log = logging.getLogger(__name__)

# diffusers 0.42.1 declares no `_repeated_blocks` for SD3Transformer2DModel; its blocks (SD3.5's
# qk-norm and dual-attention variants included) are all this class.
SD3_BLOCK = "JointTransformerBlock"


def on_by_default(setting: bool | None, *, device: torch.device, resident: bool) -> bool:
    """An unset compile / fuse-QKV setting: on for a CUDA device holding the weights. Offload hooks
    move weights inside the forward, which compiled graphs would capture or break on."""
    if setting is not None:
        return setting
    return device.type == "cuda" and resident


def compile_transformer(pipe: Any, *, scope: CompileScope = "blocks", mode: str, backend: str) -> None:
    transformer = pipe.transformer
    if scope == "blocks":
        transformer._repeated_blocks = [SD3_BLOCK]
        transformer.compile_repeated_blocks(mode=mode, backend=backend, fullgraph=False)
    else:
        pipe.transformer = torch.compile(transformer, mode=mode, backend=backend, fullgraph=False)


def compile_vae_decoder(pipe: Any, *, mode: str, backend: str) -> None:
    """The VAE's decoder compiled in place: at 1024² its ~10.5 TFLOP are 2.4 % of an image at the
    API's defaults, more than one of the transformer's 50 forwards (docs/performance.md §2)."""
    pipe.vae.decoder.compile(mode=mode, backend=backend, fullgraph=False)


def keep_compiled_code_in(folder: Path) -> Path:
    """Point inductor's on-disk cache (compiled kernels, FX graphs, autotuning results) at `folder`,
    unless the user set TORCHINDUCTOR_CACHE_DIR: its default lives in /tmp, which a container or a
    reboot empties, so every restart would compile from scratch. Must run before the first compile."""
    folder = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder)))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def warm_up(generator: Any, *, sizes: list[tuple[int, int]]) -> float:
    """Run one short generation (both CFG branches) at each (width, height); return the seconds."""
    total = 0.0
    for width, height in sizes:
        started = time.perf_counter()
        generator.generate(
            GenerationRequest(
                prompt="warm-up", negative_prompt="", seed=0, steps=2, width=width, height=height
            )
        )
        seconds = time.perf_counter() - started
        log.info("warm-up at %dx%d took %.1f s", width, height, seconds)
        total += seconds
    return total
