"""`benchmarks/quality.py --save-images` keeps what adherence judged, and `--rejudge` reads it back to
the same figures without the model, refusing images saved for other pairs or settings; the few-step
section counts forwards as the server prices them; the approximations section leaves out what this
CPU would only emulate, saying so, unless told to run it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pipelines.toy
from server.pricing import model_evaluations

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "quality.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(SCRIPT), "--only", "adherence", "--size", "64", "--no-cfg1", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


def _table(stdout: str) -> list[str]:
    # Every line of the report but the timing column's.
    return [line.rsplit(None, 1)[0] for line in stdout.splitlines() if "API defaults" in line]


def test_saved_images_are_rejudged_to_the_same_figures(tmp_path: Path) -> None:
    saved = _run("--model", "tiny", "--pairs", "3", "--save-images", str(tmp_path))
    assert saved.returncode == 0, saved.stderr
    folder = tmp_path / "api-defaults-cfg-5"
    assert sorted(p.name for p in folder.iterdir()) == [
        "0000.png",
        "0001.png",
        "0002.png",
        "pairs.json",
        "settings.json",
    ]

    again = _run("--pairs", "3", "--rejudge", str(tmp_path))
    assert again.returncode == 0, again.stderr
    assert _table(again.stdout) == _table(saved.stdout)

    assert "(images saved from model tiny)" in again.stdout

    other = _run("--pairs", "3", "--seed", "4", "--rejudge", str(tmp_path))
    assert other.returncode != 0
    assert "holds other pairs" in other.stderr
    # The header would name a size or shift the pixels were not sampled at.
    larger = _run("--pairs", "3", "--rejudge", str(tmp_path), "--size", "128")
    assert larger.returncode != 0 and "width 64 (not 128)" in larger.stderr
    shifted = _run("--pairs", "3", "--rejudge", str(tmp_path), "--shift", "6")
    assert shifted.returncode != 0 and "shift 3.0 (not 6.0)" in shifted.stderr


def test_rejudging_at_another_size_reads_the_same_pixels_resized(tmp_path: Path) -> None:
    saved = _run("--model", "tiny", "--pairs", "2", "--save-images", str(tmp_path))
    assert saved.returncode == 0, saved.stderr
    smaller = _run("--pairs", "2", "--rejudge", str(tmp_path), "--judge-size", "32")
    assert smaller.returncode == 0, smaller.stderr
    assert "(the saved images read at 32 px)" in smaller.stdout
    assert len(_table(smaller.stdout)) == len(_table(saved.stdout))

    # The size is only for saved images: generating takes --size, and a thumbnail is no reading.
    alone = _run("--model", "tiny", "--pairs", "2", "--judge-size", "32")
    assert alone.returncode != 0
    assert "--judge-size" in alone.stderr
    tiny = _run("--pairs", "2", "--rejudge", str(tmp_path), "--judge-size", "8")
    assert tiny.returncode != 0


def test_the_few_step_section_counts_forwards_as_priced_and_gives_a_lora_against_itself_no_gain() -> None:
    lora = str(pipelines.toy.FEW_STEP_DIR)
    command = [sys.executable, str(SCRIPT), "--only", "few-step", "--size", "64", "--pairs", "2"]
    command += ["--few-steps", "4", "--lora", lora, "--also-lora", lora, "--few-sampler", "Heun"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    forwards = {
        line.split("  ")[0]: int(line.split()[-8]) for line in done.stdout.splitlines() if "Heun" in line
    }

    def priced(steps: int, guidance: float) -> int:
        return model_evaluations(scheduler="Heun", steps=steps, guidance_scale=guidance)

    # Heun calls the model twice a step but the last: not steps × 1 or 2, which the column once was.
    assert forwards["LoRA, Heun 4, CFG 1"] == priced(4, 1.0) == 7
    assert forwards["base, Heun 4, CFG 5"] == priced(4, 5.0) and forwards["base, Heun 2, CFG 5"] == priced(
        2, 5.0
    )
    assert f"{lora} − it, 4 steps: +0.000 ± 0.000; lower in 0/2" in done.stdout
    refused = subprocess.run([*command[:2], "--pairs", "0"], capture_output=True, text=True, check=False)
    assert refused.returncode == 2 and "expected a positive count" in refused.stderr


def _approximation_rows(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(SCRIPT), "--only", "approximations", "--model", "tiny", "--size", "64"]
    return subprocess.run(
        [*command, "--pairs", "1", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_the_approximations_leave_out_only_what_this_cpu_emulates_and_say_so() -> None:
    import torch

    from pipelines.loading import cpu_has_native_bf16
    from pipelines.transformer_quantization import quantization_caveat

    done = _approximation_rows()
    assert done.returncode == 0, done.stderr
    rows = {line.split("  ")[0] for line in done.stdout.splitlines() if re.match(r"\w.*  +(∞|\d)", line)}
    assert {"exact (fp32)", "cache fast", "cache faster"} <= rows
    for name, native, labels in (
        ("bf16", cpu_has_native_bf16(), {"bf16", "bf16 + cache fast", "bf16 + cache faster"}),
        ("int8", quantization_caveat("int8", device=torch.device("cpu")) is None, {"int8 transformer"}),
    ):
        assert labels & rows == (labels if native else set())
        assert (f"{name}: left out (--all-variants runs it)" in done.stdout) == (not native)

    every = _approximation_rows("--all-variants")
    assert every.returncode == 0, every.stderr
    assert sum(bool(re.match(r"\w.*  +(∞|\d)", line)) for line in every.stdout.splitlines()) == 7
