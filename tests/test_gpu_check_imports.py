"""benchmarks/gpu_check.sh runs on a GPU machine that cannot reach PyPI and brings only the engine's
packages beside its own torch (benchmarks/gpu_wheels.sh): what it runs must load models, and its tests
must be collected, without the web stack, the ledger's database layer or the SDK."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Installed here, not there: none of them may be imported on gpu_check.sh's path.
SERVER_ONLY = (
    "fastapi",
    "starlette",
    "sqlalchemy",
    "alembic",
    "uvicorn",
    "segmind",
    "structlog",
    "simplejpeg",
)
GPU_TESTS = (
    "tests/pipelines/test_offload_and_quantization.py",
    "tests/pipelines/test_step_cache.py",
    "tests/pipelines/test_transformer_quantization.py",
    "tests/pipelines/test_joint_attention.py",
)


def _imported(code: str) -> list[str]:
    found = f"sorted(m for m in {SERVER_ONLY} if m in sys.modules)"
    probe = f"import json, sys\n{code}\nprint(json.dumps({found}))"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def test_loading_a_runtime_and_the_speed_benchmarks_need_no_web_stack() -> None:
    assert _imported("import server.runtime, server.config, pipelines.toy.quality") == []
    assert "fastapi" in _imported("import server.app")  # what the probe would catch


def test_the_gpu_tests_are_collected_without_the_web_stack() -> None:
    collect = (
        f"import pytest\npytest.main(['-q', '--collect-only', '-p', 'no:cacheprovider', *{GPU_TESTS!r}])"
    )
    assert _imported(collect) == []
