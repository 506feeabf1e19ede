"""`benchmarks/int8_layouts.py`, the measurement behind `OneDnnInt8Linear`'s bits: every layout gets its
own row (the layouts really differ), the server's stays near the exact image, and on a CPU without
VNNI the full-range layouts show the saturation that made the server's weights 7-bit."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.loading import cpu_has_int8_dot_products
from pipelines.transformer_quantization import onednn_int8_available

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "int8_layouts.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not onednn_int8_available(), reason="needs oneDNN's x86 quantized linear"),
]


def test_each_layout_gets_a_row_and_the_servers_stays_near_exact() -> None:
    command = [sys.executable, str(SCRIPT), "--model", "tiny", "--pairs", "1", "--size", "64"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    psnr = {m[1]: float(m[2]) for m in re.finditer(r"^(.+): ([\d.]+) dB$", done.stdout, re.MULTILINE)}
    assert len(psnr) == 5, done.stdout
    assert len(set(psnr.values())) == 5, done.stdout  # each layout ran its own arithmetic
    servers = psnr["per token, weights ±63, activations ±127 (the server's)"]
    assert servers > 45, done.stdout
    if not cpu_has_int8_dot_products():
        # 255 × 127 × 2 overflows vpmaddubsw's int16 sums: the full-range layouts fall far behind.
        assert psnr["per token, weights ±127, activations ±127"] < servers - 10, done.stdout
        assert psnr["per call, u8 in [0, 255], weights ±127 (Inductor's)"] < servers - 10, done.stdout
