"""The attention kernel choice (pipelines/attention.py): what runs for each GPU generation and set of
installed FlashAttention builds, and the reasons an explicit choice cannot run. No GPU here: the
choice is a pure function of the hardware, which the tests name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines.attention import FLASH_IMPLS, choose, pick
from pipelines.loading import ModelLoadError
from server.config import Settings
from server.runtime import load_runtime

FA3, FA4 = FLASH_IMPLS["fa3"][0], FLASH_IMPLS["fa4"][0]
HOPPER, BLACKWELL, ADA = 9, 10, 8


@pytest.mark.parametrize(
    ("major", "installed", "expected"),
    [
        (HOPPER, {FA3, FA4}, "fa4"),  # newest first
        (HOPPER, {FA3}, "fa3"),
        (BLACKWELL, {FA3, FA4}, "fa4"),
        (BLACKWELL, {FA3}, "sdpa"),  # FA3 is Hopper-only
        (ADA, {FA3, FA4}, "sdpa"),
        (HOPPER, set(), "sdpa"),
        (None, {FA3, FA4}, "sdpa"),  # no CUDA device
    ],
)
def test_auto_takes_the_newest_flash_attention_this_gpu_runs_and_that_is_installed(
    major: int | None, installed: set[str], expected: str
) -> None:
    assert pick("auto", cuda_major=major, importable=installed) == (expected, None)


@pytest.mark.parametrize(
    ("choice", "major", "installed", "fragment"),
    [
        ("fa3", BLACKWELL, {FA3}, "needs compute capability 9.x, this GPU is 10.x"),
        ("fa4", ADA, {FA4}, "needs compute capability 9.x or 10.x"),
        ("fa3", HOPPER, set(), "needs the `flash_attn_interface` module"),
        ("cudnn", None, set(), "needs a CUDA GPU"),
    ],
)
def test_an_explicit_choice_that_cannot_run_says_why(
    choice: str, major: int | None, installed: set[str], fragment: str
) -> None:
    kernel, reason = pick(choice, cuda_major=major, importable=installed)  # type: ignore[arg-type]
    assert kernel == "sdpa" and reason is not None and fragment in reason


def test_explicit_choices_that_can_run() -> None:
    assert pick("fa3", cuda_major=HOPPER, importable={FA3}) == ("fa3", None)
    assert pick("cudnn", cuda_major=ADA, importable=set()) == ("cudnn", None)
    assert pick("sdpa", cuda_major=None, importable=set()) == ("sdpa", None)


def test_this_cpu_machine_keeps_pytorchs_choice() -> None:
    assert choose("auto", torch.device("cpu")) == ("sdpa", None)


def test_the_server_refuses_an_impossible_kernel_before_loading(data_dir: Path) -> None:
    settings = Settings(
        data_dir=data_dir, model={"id": "/nonexistent/weights"}, performance={"attention": "fa3"}
    )
    with pytest.raises(ModelLoadError, match="--attention fa3 needs a CUDA GPU"):
        load_runtime(settings)
