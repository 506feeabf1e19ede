"""The benchmark scripts that no other test runs, each once at its smallest settings: a change that
breaks one fails here rather than in the hands of the next person who measures with it. The figures
are the scripts' to print and are not checked; each must run through and print its last table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# script: (arguments, a line of what it prints at the end); "{tmp}" is the test's own folder.
CASES: dict[str, tuple[list[str], str]] = {
    "ledger_ops.py": (["--requests", "5"], "one request, in all"),
    "step_cache_moves.py": (["--model", "tiny", "--size", "64", "--pairs", "1", "--steps", "4"], "faster"),
    "toy_grid.py": (["{tmp}/grid.jpg", "--model", "tiny", "--size", "64", "--seeds", "1"], "wrote "),
    "toy_train_step.py": (["--sizes", "32:2"], "bf16 speed-up"),
    "throughput.py": (
        ["--rounds", "1", "--requests", "1", "--clients", "2", "--data-dir", "{tmp}"],
        "speed-up batching on / off",
    ),
    "load_test.py": (["--rate", "2", "--duration", "2", "--steps", "10"], "ledger audit: ok"),
    "cpu_matmul.py": (["--repeats", "1"], "int8, oneDNN"),
    "tiny_latency.py": (["--repeats", "1", "--data-dir", "{tmp}"], "ratio HTTP / our generator"),
    "server_overhead.py": (
        ["--sizes", "512", "--prompts", "original", "--repeats", "1", "--data-dir", "{tmp}"],
        "ours/baseline",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", CASES)
def test_the_script_runs_through(script: str, tmp_path: Path) -> None:
    arguments, last_words = CASES[script]
    arguments = [a.replace("{tmp}", str(tmp_path)) for a in arguments]
    command = [sys.executable, str(BENCHMARKS / script), *arguments]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert last_words in done.stdout, done.stdout[-3000:]


def test_the_collapsed_zero_context_is_the_same_function() -> None:
    """zero_context.py's claim: one context token with ln(L) on its logit stands for L equal ones."""
    command = [sys.executable, str(BENCHMARKS / "zero_context.py"), "--width", "128", "--depth", "2"]
    command += ["--size", "64", "--rounds", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(r"largest difference ([\d.e+-]+) of", done.stdout)
    assert found is not None, done.stdout
    assert float(found[1]) < 1e-5, done.stdout  # float rounding, not a different model
    assert "a guided step of two rows" in done.stdout


@pytest.mark.slow
@pytest.mark.ray
def test_ray_replicas_runs_through() -> None:
    try:
        import ray.serve  # noqa: F401
    except ImportError as exc:
        if os.environ.get("CI"):  # as tests/server/test_ray.py: CI cannot pass by skipping
            pytest.fail(f"Ray Serve is required in CI: {exc}")
        pytest.skip(f"Ray Serve unavailable: {exc} (the `ray` extra)")
    command = [sys.executable, str(BENCHMARKS / "ray_replicas.py"), "--requests", "4", "--clients", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "images/s" in done.stdout, done.stdout[-3000:]


def test_load_test_refuses_a_request_the_api_would_refuse() -> None:
    command = [sys.executable, str(BENCHMARKS / "load_test.py"), "--steps", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "the API refuses" in done.stderr, done.stderr[-3000:]
