"""`--lora PATH[:SCALE]`: a LoRA made here with peft on the tiny model, saved in diffusers' layout,
fused by the serving code at start-up; the merged weights are checked against the file's matrices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipelines.loading import ModelLoadError
from pipelines.lora import LoraError, LoraSpec
from pipelines.request import GenerationRequest
from server.config import Settings
from server.runtime import Runtime, load_runtime

pytest.importorskip("peft", reason="the test extra installs peft")

REQUEST = GenerationRequest(prompt="a lighthouse", seed=4, width=128, height=128, steps=6)
RANK = 4
LAYER = "transformer_blocks.0.attn.to_q"


@pytest.fixture(scope="module")
def lora_file(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer: Any = SD3Transformer2DModel.from_pretrained(tiny_dir / "transformer")
    torch.manual_seed(0)
    # init_lora_weights=False: both matrices random, so the LoRA changes the model (peft's default
    # starts B at zero, an identity).
    config = LoraConfig(
        r=RANK,
        lora_alpha=2 * RANK,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        init_lora_weights=False,
    )
    transformer.add_adapter(config)
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusion3Pipeline.save_lora_weights(
        folder,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=config.to_dict(),  # keeps lora_alpha, as trainers' files do
    )
    return folder / "pytorch_lora_weights.safetensors"


def _runtime(tmp_path: Path, tiny_dir: Path, *lora: str, **performance: object) -> Runtime:
    model = {"id": str(tiny_dir), "device": "cpu", "dtype": "fp32", "lora": list(lora)}
    return load_runtime(Settings(data_dir=tmp_path, model=model, performance=performance))


def _image(runtime: Runtime) -> np.ndarray:
    return runtime.generator.generate(REQUEST).images[0].astype(np.int16)  # type: ignore[attr-defined]


def test_the_fused_weight_is_the_base_plus_the_scaled_product(
    tmp_path: Path, tiny_dir: Path, runtime: Runtime, lora_file: Path
) -> None:
    served = _runtime(tmp_path, tiny_dir, f"{lora_file}:0.5")
    assert f"LoRA: {lora_file} × 0.5" in served.description
    state = load_file(lora_file)
    down, up = state[f"transformer.{LAYER}.lora_A.weight"], state[f"transformer.{LAYER}.lora_B.weight"]
    base = runtime.generator.pipe.transformer.get_submodule(LAYER).weight  # type: ignore[attr-defined]
    fused = served.generator.pipe.transformer.get_submodule(LAYER)  # type: ignore[attr-defined]
    assert type(fused) is torch.nn.Linear  # merged and unloaded: no PEFT layer left in the forward
    alpha_over_rank = 2.0  # lora_alpha / r, read back from the file's metadata
    expected = base + 0.5 * alpha_over_rank * (up @ down)
    torch.testing.assert_close(fused.weight, expected, atol=1e-5, rtol=1e-5)


def test_scale_zero_is_the_base_model_and_scale_one_changes_the_image(
    tmp_path: Path, tiny_dir: Path, runtime: Runtime, lora_file: Path
) -> None:
    base = _image(runtime)
    assert np.array_equal(_image(_runtime(tmp_path / "zero", tiny_dir, f"{lora_file}:0")), base)
    assert np.abs(_image(_runtime(tmp_path / "one", tiny_dir, str(lora_file))) - base).mean() > 1


def test_fused_qkv_and_int8_run_on_the_merged_weights(
    tmp_path: Path, tiny_dir: Path, lora_file: Path
) -> None:
    pytest.importorskip("torchao", reason="the test extra installs torchao")
    plain = _image(_runtime(tmp_path / "plain", tiny_dir, str(lora_file)))
    fused = _runtime(tmp_path / "fused", tiny_dir, str(lora_file), fuse_qkv=True)
    assert hasattr(fused.generator.pipe.transformer.transformer_blocks[0].attn, "to_qkv")  # type: ignore[attr-defined]
    assert np.abs(_image(fused) - plain).max() <= 1  # the same weights, concatenated
    int8 = _runtime(tmp_path / "int8", tiny_dir, str(lora_file), quantize="int8")
    assert "LoRA" in int8.description and "transformer in int8" in int8.description
    assert np.abs(_image(int8) - plain).mean() < 1  # quantized from the merged weights


def test_a_missing_file_stops_the_start_with_a_sentence(tmp_path: Path, tiny_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="could not be loaded"):
        _runtime(tmp_path, tiny_dir, str(tmp_path / "absent.safetensors"))


def test_a_lora_for_other_layers_is_refused_not_ignored(tmp_path: Path, tiny_dir: Path) -> None:
    foreign = tmp_path / "foreign.safetensors"
    save_file(
        {
            "transformer.no_such_block.proj.lora_A.weight": torch.zeros(RANK, 8),
            "transformer.no_such_block.proj.lora_B.weight": torch.zeros(8, RANK),
        },
        str(foreign),
    )
    with pytest.raises(ModelLoadError, match="LoRA"):
        _runtime(tmp_path, tiny_dir, str(foreign))


@pytest.mark.parametrize(
    ("text", "source", "scale"),
    [
        ("loras/hyper.safetensors", "loras/hyper.safetensors", 1.0),
        ("loras/hyper.safetensors:0.125", "loras/hyper.safetensors", 0.125),
        (r"C:\loras\hyper.safetensors", r"C:\loras\hyper.safetensors", 1.0),
        (r"C:\loras\hyper.safetensors:-1.5", r"C:\loras\hyper.safetensors", -1.5),
        ("ByteDance/Hyper-SD", "ByteDance/Hyper-SD", 1.0),
    ],
)
def test_the_scale_is_only_a_number_after_the_last_colon(text: str, source: str, scale: float) -> None:
    assert LoraSpec.parse(text) == LoraSpec(source=source, scale=scale)


@pytest.mark.parametrize("text", ["", "x.safetensors:nan", "x.safetensors:inf"])
def test_a_malformed_lora_setting_is_refused(text: str) -> None:
    with pytest.raises(LoraError):
        LoraSpec.parse(text)


def test_a_malformed_scale_stops_the_start_before_the_model_loads(tmp_path: Path) -> None:
    # The model id does not exist: a load would fail differently, so the LoRA's error came first.
    settings = Settings(
        data_dir=tmp_path, model={"id": "/nonexistent/weights", "lora": ["x.safetensors:nan"]}
    )
    with pytest.raises(ModelLoadError, match="not a finite number"):
        load_runtime(settings)
