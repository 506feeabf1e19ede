"""The chain of training commands behind the committed toy, as data: `python -m pipelines.toy.recipe OUT`.

The committed weights (`pipelines/toy/model`) are not one run of `pipelines.toy.train` but a run from
nothing followed by six fine-tunes, each started (`--init`) from the one before; docs/toy.md has one
section per run, saying why it was made and what it measured. This module holds those seven
commands, so that retraining the toy is one command rather than seven read out of the docs, and so
that a test can check them against the settings the committed folder itself records (its manifest
nests each fine-tune's parent, back to run 19; run 17, the run from nothing, predates that field
and is checked only against docs/toy.md §19).

    python -m pipelines.toy.recipe OUT            # all seven stages, OUT/run17 ... OUT/run35
    python -m pipelines.toy.recipe OUT --print    # the commands only

A stage whose folder already holds a finished run of the stage's own settings, started from the
files the stage before it holds now, is skipped, so an interrupted chain resumes where it stopped.
At the end the last stage's files are compared, by their sha256, with the committed folder's: they
match only on the machine type and torch build the committed run used (docs/toy.md §3).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.toy import MODEL_DIR, train

_REPOSITORY = Path(__file__).resolve().parents[2]  # where `-m pipelines.toy.train` resolves

# What the fine-tunes share: word tokens (§18) and the pooled vector dropped in half the steps (§19);
# from run 21 on, one thread, a quarter of the captions as shorter prompts (§13, §22) and a shape
# weight of 2; from run 31 on, the outline weight (§23) at a lower rate, and half the captions
# without a position word, their shapes drawn twice as large (§28, §29).
_FINE_TUNE = ("--depth", "4", "--words", "--drop-pooled", "0.5", "--warmup", "50", "--eval-every", "0")
_LATER = (*_FINE_TUNE, "--threads", "1", "--partial", "0.25", "--shape-weight", "2")
_OUTLINE = ("--edge-weight", "2", "--lr", "1e-4")
_LARGE_UNPOSITIONED = (*_OUTLINE, "--unpositioned-share", "0.5", "--unpositioned-scale", "2")


@dataclass(frozen=True)
class Stage:
    name: str
    section: str  # of docs/toy.md
    minutes: int  # what it took on this project's 2-core machine (on one core from run 21 on)
    args: tuple[str, ...]  # `pipelines.toy.train`'s arguments, less OUT and --init


STAGES: tuple[Stage, ...] = (
    Stage(
        "run17",
        "§19",
        96,
        (
            "--threads", "2", "--depth", "4", "--words", "--drop-pooled", "0.5", "--shape-weight", "4",
            "--vae-steps", "6000", "--vae-batch", "16",
            "--phase", "128:4800:32:8192", "--phase", "256:1000:16:4096", "--eval-every", "1600",
        ),
    ),
    Stage(
        "run19",
        "§21",
        22,
        (
            *_FINE_TUNE, "--threads", "2", "--shape-weight", "1", "--lr", "2e-4",
            "--phase", "256:300:16:4096", "--phase", "+512:500:4:1024",
        ),
    ),
    Stage(
        "run21",
        "§22",
        53,
        (*_LATER, "--lr", "2e-4", "--phase", "256:400:16:4096", "--phase", "+512:900:4:1024@12"),
    ),
    Stage(
        "run24",
        "§24",
        59,
        (
            *_LATER, "--seed", "2", "--edge-weight", "2", "--lr", "2e-4",
            "--phase", "256:400:16:4096", "--phase", "+512:900:4:1024@12", "--phase", "+128:300:16:4096",
        ),
    ),
    Stage(
        "run31",
        "§29",
        55,
        (
            *_LATER, "--seed", "4", *_LARGE_UNPOSITIONED,
            "--phase", "256:300:16:4096", "--phase", "+512:700:4:1024@12", "--phase", "+128:200:16:4096",
        ),
    ),
    Stage(
        "run32",
        "§30",
        59,
        (
            *_LATER, "--seed", "5", *_LARGE_UNPOSITIONED,
            "--phase", "256:200:16:4096", "--phase", "+512:900:4:1024@12", "--phase", "+128:100:16:4096",
        ),
    ),
    Stage(
        "run35",
        "§33",
        58,
        (
            *_LATER, "--seed", "7", *_LARGE_UNPOSITIONED,
            "--phase", "256:100:16:2048", "--phase", "+512:900:4:1024@12", "--phase", "+128:100:16:2048",
        ),
    ),
)  # fmt: skip


def argv(index: int, root: Path) -> list[str]:
    """`pipelines.toy.train`'s argument list for stage `index`, writing under `root`."""
    stage = STAGES[index]
    out = [str(root / stage.name)]
    if index == 0:
        # Only the VAE's settings key the cache: an interrupted first stage does not retrain it.
        out += ["--vae-cache", str(root / "vae-cache")]
    else:
        out += ["--init", str(root / STAGES[index - 1].name)]
    return out + list(stage.args)


def settings(arguments: Sequence[str]) -> dict[str, Any]:
    """The configuration a train command records in its manifest, less `init` (a machine path),
    in the manifest's JSON form."""
    cfg, _, _, _ = train._arguments(list(arguments))
    record = train.config_record(cfg)
    record.pop("init")
    return dict(json.loads(json.dumps(record)))


def differences(recorded: dict[str, Any], arguments: Sequence[str]) -> dict[str, tuple[Any, Any]]:
    """Where a recorded configuration and the one `arguments` give disagree, as {field: (recorded,
    given)}, `init` (a machine path) aside. A field the record lacks was added to the script after
    that run, with a default that trains as before it existed (docs/toy.md §3), so it agrees when
    the command leaves it at that default."""
    given = settings(arguments)
    defaults = json.loads(json.dumps(train.config_record(train.TrainConfig())))
    out = {}
    for name in (recorded.keys() | given.keys()) - {"init"}:
        expected = recorded.get(name, defaults.get(name))
        if expected != given.get(name):
            out[name] = (recorded.get(name), given.get(name))
    return out


def recorded_chain(folder: Path = MODEL_DIR) -> list[dict[str, Any]]:
    """The configurations a toy folder's manifest records, oldest first: its parents' (as far back
    as they were recorded), then its own."""
    chain = []
    manifest = train._read_manifest(folder)
    while manifest:
        chain.append(dict(manifest.get("config", {})))
        manifest = manifest.get("parent", {})
    return chain[::-1]


def finished(index: int, root: Path) -> bool:
    """Whether stage `index`'s folder holds a complete run of its own settings, started from the
    files the stage before it holds now (a stage before it that was rerun makes it stale)."""
    manifest = train._read_manifest(root / STAGES[index].name)
    if not manifest or "files" not in manifest:
        return False
    if index > 0:
        before = train._read_manifest(root / STAGES[index - 1].name).get("files")
        if manifest.get("parent", {}).get("files") != before:
            return False
    return not differences(manifest.get("config", {}), argv(index, root))


def _command(arguments: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "pipelines.toy.train", *arguments]


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.toy.recipe",
        description="Retrain the committed toy from nothing: the seven `pipelines.toy.train` runs behind it.",
    )
    parser.add_argument("root", type=Path, help="a folder for the stages (OUT/run17 ... OUT/run35)")
    parser.add_argument("--print", dest="print_only", action="store_true", help="print the commands only")
    parsed = parser.parse_args(args)
    # Absolute: the stages run from the repository root, wherever this was started.
    root: Path = parsed.root.resolve()
    total = sum(stage.minutes for stage in STAGES)
    print(f"# {len(STAGES)} stages, about {total / 60:.1f} h on 2 CPU cores (docs/toy.md)", flush=True)
    for index, stage in enumerate(STAGES):
        command = _command(argv(index, root))
        print(f"# {stage.name} (docs/toy.md {stage.section}, ~{stage.minutes} min)", flush=True)
        print(" ".join(command), flush=True)
        if parsed.print_only:
            continue
        if finished(index, root):
            print(f"# {stage.name}: already done, skipped", flush=True)
            continue
        status = subprocess.call(command, cwd=_REPOSITORY)
        if status != 0:
            print(f"# {stage.name} failed (exit status {status}); rerun to resume from it", file=sys.stderr)
            return status
    if parsed.print_only:
        return 0
    made = train._read_manifest(root / STAGES[-1].name).get("files", {})
    committed = train._read_manifest(MODEL_DIR).get("files", {})
    differ = sorted(name for name in committed.keys() | made.keys() if committed.get(name) != made.get(name))
    if differ:
        print(f"# differs from the committed folder in {len(differ)} files: {', '.join(differ)}")
        print("# (bit-identical only on the machine type and torch build of the committed run)")
    else:
        print("# bit-identical to the committed folder")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
