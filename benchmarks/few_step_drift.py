"""How far a phased few-step LoRA's own Euler steps drift from its teacher's states (docs/toy.md §36).

    python benchmarks/few_step_drift.py OUT/teacher-pairs.pt --lora pipelines/toy/few-step-4
    python benchmarks/few_step_drift.py OUT10/teacher-pairs.pt --lora pipelines/toy/few-step-10

OUT is a `python -m pipelines.toy.distill OUT --method phased` run's folder: its teacher pairs hold
the teacher's states at the student's σ's. From each pair's start noise the base model and each
`--lora` take their own Euler steps at guidance 1, and at every σ the mean squared distance of
their state from the teacher's is printed. The pairs are training pairs, so this is a diagnostic of
where the miss accumulates (teacher forcing never shows a student its own states), not a score:
`quality.py --only few-step` is the score.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import load  # noqa: E402

from pipelines.toy.distill import rolled_states  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", type=Path, help="a phased run's teacher-pairs.pt")
    parser.add_argument("--lora", type=Path, action="append", default=[], help="a LoRA folder (repeatable)")
    parser.add_argument("--count", type=int, default=64, help="how many of the pairs")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = torch.load(args.pairs)
    if "states" not in data:
        parser.error(f"{args.pairs} holds no teacher states: it is not a --method phased run's")
    n = min(args.count, data["states"].shape[0])
    states, sigmas = data["states"][:n], data["sigmas"]
    context, pooled = data["context"][:n], data["pooled"][:n]
    one = torch.ones(n, dtype=torch.long)
    print(f"## Mean squared distance from the teacher's state, {n} pairs of {args.pairs}")
    print("model | " + " | ".join(f"σ {float(s):.3f}" for s in sigmas[1:]))
    for lora in [None, *args.lora]:
        transformer = load("toy", lora=[str(lora)] if lora else None).pipe.transformer
        x, row = states[:, 0], []
        for k in range(len(sigmas) - 1):
            x = rolled_states(transformer, x, sigmas[k:], one, context, pooled)  # one step from σ_k
            row.append(f"{(x - states[:, k + 1]).pow(2).mean().item():.4f}")
        print(f"{lora or 'base'} | " + " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
