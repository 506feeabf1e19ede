"""`benchmarks/speed_modes.py`, the table the first session with a GPU measures (gpu_check.sh), runs
through: every mode asked for gets its row, a mode this machine cannot run says why instead of
ending the run, and the exact mode is the reference of the ratios and the PSNR."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "speed_modes.py"


def test_every_mode_asked_for_gets_a_row_or_says_why_not(tmp_path: Path) -> None:
    command = [sys.executable, str(SCRIPT), "--model", "tiny", "--size", "64", "--steps", "4"]
    command += ["--device", "cpu", "--repeats", "1", "--data-dir", str(tmp_path)]
    command += ["--modes", "exact", "cache-faster", "fp8"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines() if line[:1].isalpha()}
    exact = rows["exact"]
    assert exact[2] == "1.00" and exact[-2] == "inf", done.stdout
    assert float(rows["cache-faster"][1]) > 0
    # fp8 needs a CUDA GPU: its row says so, and the run went on past it.
    assert "fp8" in done.stdout and "cuda" in done.stdout.lower(), done.stdout
