"""What one training step of the toy SD3's transformer costs, per image size, depth and precision.

    python benchmarks/toy_train_step.py                                   # depth 3, 1 thread, ~1 min
    python benchmarks/toy_train_step.py --depths 3 4 --threads 2 --sizes 128:32 256:16 512:4

Sizes the phases of `python -m pipelines.toy.train` (docs/toy.md §6). Each step is the script's own:
the transformer it builds (`build_transformer`), its velocity call on the serving-length context
(154 text tokens), an MSE loss, backward and an AdamW step; fp32 and bf16 autocast are interleaved
(A, B, A, B …) so that other work on the machine hits both alike. Prints the median seconds per step
and the bf16 speed-up for each size. Random tensors stand in for latents and conditioning: the cost
depends only on their shapes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from pipelines.toy.train import TrainConfig, build_transformer, velocity

TEXT_TOKENS = 154  # 77 CLIP + 77 T5, the serving length the toy is trained at
CONTEXT_WIDTH, POOLED_WIDTH = 96, 80  # the tiny text encoders' widths (pipelines/tiny.py)


def step_seconds(
    transformer: torch.nn.Module, optimizer: torch.optim.Optimizer, *, size: int, batch: int, bf16: bool
) -> float:
    latent = torch.randn(batch, 16, size // 8, size // 8)
    context = torch.randn(batch, TEXT_TOKENS, CONTEXT_WIDTH)
    pooled = torch.randn(batch, POOLED_WIDTH)
    sigma = torch.full((batch,), 0.5)
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        v = velocity(transformer, latent, sigma, context, pooled)
    loss = F.mse_loss(v.float(), latent)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[3])
    parser.add_argument("--sizes", nargs="+", default=["128:32", "256:16", "512:4"], help="SIZE:BATCH")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--repeats", type=int, default=4, help="timed steps per contender (after one warm-up)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()[0]:.2f}")
    print("depth  size x batch   fp32 s/step   bf16 s/step   bf16 speed-up")
    for depth in args.depths:
        transformer = build_transformer(
            TrainConfig(depth=depth), joint_attention_dim=CONTEXT_WIDTH, pooled_dim=POOLED_WIDTH
        )
        optimizer = torch.optim.AdamW(transformer.parameters(), lr=1e-4)
        for spec in args.sizes:
            size, batch = (int(part) for part in spec.split(":"))
            times: dict[bool, list[float]] = {False: [], True: []}
            for bf16 in (False, True):  # warm-up
                step_seconds(transformer, optimizer, size=size, batch=batch, bf16=bf16)
            for i in range(args.repeats):
                for bf16 in (False, True) if i % 2 == 0 else (True, False):
                    times[bf16].append(
                        step_seconds(transformer, optimizer, size=size, batch=batch, bf16=bf16)
                    )
            slow, fast = statistics.median(times[False]), statistics.median(times[True])
            row = f"{depth:>5}  {size:>4} x {batch:<6}  {slow:>11.3f}   {fast:>11.3f}"
            print(f"{row}   {slow / fast:>12.2f}x")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
