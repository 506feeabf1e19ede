"""The toy SD3: a procedural world of coloured shapes, its judge, and the script that trains on it.

See issue 13: a small SD3 built from the real diffusers classes and trained on CPU, so that image
quality and prompt adherence can be measured in numbers.
"""

from pathlib import Path

# Where the trained toy lives in a checkout (and in the installed package): `--model toy` loads it
# from here, through the same code as any downloaded diffusers folder. It is written by
# `python -m pipelines.toy.train pipelines/toy/model` and committed with its manifest.
MODEL_DIR = Path(__file__).resolve().parent / "model"
# A 4-step LoRA for it (issue 16's few-step mode, docs/toy.md §35–36, §38): `--lora` with this folder,
# then Euler, 4 steps, guidance 1; and a 10-step one, the txt2img page's fewest steps (§37–38). Written
# by `python -m pipelines.toy.distill` (their manifests say how).
FEW_STEP_DIR = Path(__file__).resolve().parent / "few-step-4"
FEW_STEP_10_DIR = Path(__file__).resolve().parent / "few-step-10"


def folder_of(model: str) -> Path:
    """The folder a `--model` value names where it names a folder: "toy" is `MODEL_DIR`."""
    return MODEL_DIR if model == "toy" else Path(model)
