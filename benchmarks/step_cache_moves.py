"""How far the first block's residual moves between forwards: what the step cache's thresholds are
compared with, on a given model, so that a level's threshold can be read against the model's own moves.

    python benchmarks/step_cache_moves.py --model toy --size 256 --pairs 6
    python benchmarks/step_cache_moves.py --model /path/to/sd3-medium --size 1024 --pairs 4   # real weights

Every image is generated with a step cache that never reuses (threshold 0), so each forward runs
whole and the move it would have been judged by (mean |r − r_ref| / mean |r_ref|, against the last
whole forward of the same conditionings: the previous step's) is recorded. The output gives the
moves' quantiles and, for each named level, the share of checks below its threshold: an upper
bound of what that level can skip (its warm-up and `max_consecutive` cap it further). Random weights
say nothing here: their residuals do not behave like a trained model's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines import sd3, step_cache  # noqa: E402
from pipelines.request import GenerationRequest  # noqa: E402
from pipelines.toy import quality  # noqa: E402

PROMPTS = (
    "a lighthouse on a cliff at dusk, oil painting",
    "a bowl of ramen, studio photo",
    "a fox in the snow, watercolour",
    "an astronaut riding a horse, photograph",
)


MOVES: list[float] = []


class RecordingCache(step_cache.StepCache):
    """A step cache that records every move it is asked to judge in MOVES, and never reuses."""

    def _may_reuse(self, entry: step_cache._Entry, first_residual: torch.Tensor) -> bool:
        if entry.first_residual.shape == first_residual.shape:
            MOVES.append(step_cache.relative_move(first_residual, entry.first_residual))
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--pairs", type=int, default=6, help="images (toy: prompt×seed pairs of its world)")
    args = parser.parse_args()

    from server.config import Settings
    from server.runtime import load_runtime

    settings = Settings(
        data_dir=Path(tempfile.mkdtemp(prefix="sd3-moves-")), model={"id": args.model, "device": args.device}
    )
    generator = load_runtime(settings).generator
    assert isinstance(generator, sd3.SD3Generator)  # a local pipeline: its sampling loop is patched below
    base = GenerationRequest(
        prompt="", width=args.size, height=args.size, steps=args.steps, step_cache="fast"
    )
    if args.model == "toy":
        requests = [
            replace(base, prompt=c.text, seed=s) for c, s in quality.prompt_seed_pairs(args.pairs, seed=3)
        ]
    else:
        requests = [replace(base, prompt=PROMPTS[i % len(PROMPTS)], seed=i) for i in range(args.pairs)]
    # The sampling loop builds its cache from this name: swap in the recording one for this run.
    sd3.StepCache = RecordingCache  # type: ignore[attr-defined,misc]
    for request in requests:
        generator.generate(request)
    moves = np.array(MOVES)
    print(f"## {args.model} at {args.size}², {args.steps} steps, DPM++ 2M, CFG 5: {len(moves)} checks")
    quantiles = (0.05, 0.25, 0.5, 0.75, 0.95)
    print(
        "move quantiles "
        + "  ".join(
            f"p{int(q * 100)} {v:.3f}" for q, v in zip(quantiles, np.quantile(moves, quantiles), strict=True)
        )
    )
    for level, policy in step_cache.LEVELS.items():
        if policy is not None:
            below = float((moves < policy.threshold).mean())
            print(f"{level:<7} threshold {policy.threshold:.2f}: {below:.0%} of checks below it")


if __name__ == "__main__":
    main()
