"""Model sources, devices and precisions; every load failure is one clear sentence."""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict, Unpack

import huggingface_hub.constants
import pytest
import torch

from pipelines.loading import (
    ModelLoadError,
    ModelSpec,
    cpu_has_int8_dot_products,
    cpu_has_native_bf16,
    load_model,
    resolve_device,
    resolve_dtype,
)
from pipelines.options import Device, Dtype


class SpecFields(TypedDict, total=False):
    """The ModelSpec fields that a test here sets."""

    device: Device
    dtype: Dtype
    load_t5: bool


def spec(source: str, tmp_path: Path, **fields: Unpack[SpecFields]) -> ModelSpec:
    return ModelSpec(source=source, tiny_dir=tmp_path / "tiny", **fields)


def test_auto_device_and_dtype_on_a_cpu_machine() -> None:
    assert resolve_device("auto").type in {"cuda", "mps", "cpu"}
    assert resolve_dtype("auto", torch.device("cuda")) is torch.float16
    assert resolve_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert resolve_dtype("fp32", torch.device("cpu")) is torch.float32


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"),
    [(False, False, torch.float32), (True, False, torch.bfloat16), (False, True, torch.bfloat16)],
)
def test_auto_on_a_cpu_is_bf16_only_where_the_cpu_has_it(
    monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool, expected: torch.dtype
) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert cpu_has_native_bf16() is (expected is torch.bfloat16)
    assert resolve_dtype("auto", torch.device("cpu")) is expected


@pytest.mark.parametrize(("vnni", "amx"), [(False, False), (True, False), (False, True)])
def test_int8_dot_products_are_vnni_or_amx(monkeypatch: pytest.MonkeyPatch, vnni: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: vnni)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)  # not asked
    assert cpu_has_int8_dot_products() is (vnni or amx)


def test_a_pytorch_without_the_cpu_checks_gets_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_says_what_to_do() -> None:
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_a_local_diffusers_folder_loads_through_the_same_path(tmp_path: Path, tiny_dir: Path) -> None:
    loaded = load_model(spec(str(tiny_dir), tmp_path, device="cpu", dtype="bf16"))
    assert loaded.description.startswith("diffusers folder")
    assert loaded.pipe.transformer.dtype is torch.bfloat16


def test_auto_loads_every_component_in_the_precision_this_cpu_calls_for(
    tmp_path: Path, tiny_dir: Path
) -> None:
    loaded = load_model(spec(str(tiny_dir), tmp_path, device="cpu"))
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert loaded.dtype is expected
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        assert getattr(loaded.pipe, name).dtype is expected, name


def test_the_t5_encoder_can_be_left_out(tmp_path: Path, tiny_dir: Path) -> None:
    loaded = load_model(spec(str(tiny_dir), tmp_path, load_t5=False))
    assert loaded.pipe.text_encoder_3 is None


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("./no/such/folder", "neither an existing file or folder nor a Hugging Face id"),
        ("not a model id", "neither an existing file or folder"),
    ],
)
def test_a_missing_source_is_one_sentence(tmp_path: Path, source: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_model(spec(source, tmp_path))


def test_a_folder_that_is_not_a_diffusers_model(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_model(spec(str(tmp_path / "empty"), tmp_path))


def test_a_file_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="not a checkpoint"):
        load_model(spec(str(tmp_path / "notes.txt"), tmp_path))


def test_a_hub_model_that_cannot_be_downloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No network here: offline mode makes the Hub client answer at once instead of retrying.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError) as caught:
        load_model(spec("stabilityai/stable-diffusion-3-medium-diffusers", tmp_path))
    message = str(caught.value)
    assert "stabilityai/stable-diffusion-3-medium-diffusers" in message
    assert "Traceback" not in message and "\n" not in message
