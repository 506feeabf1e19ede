"""SD3.5 single files (`sd3.5_large.safetensors`, `..._large_turbo`, `sd3.5_medium`), made from the twins.

Each tiny SD3.5 twin is written in Stability's original layout by `export_single_file` and read back
by diffusers' `from_single_file` through `load_model`, with the Hub offline and the configs from the
twin's own folder without the weights the file carries, so every such weight must come through the
file. Two layouts: everything in one file (as ComfyUI saves), and MMDiT + VAE only, as Stability
ships SD3.5, whose text encoders then come from the config folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

from pipelines.architectures import ARCHITECTURES, build_components
from pipelines.checkpoints import (
    SingleFileContents,
    export_single_file,
    inspect_single_file,
    main,
    single_file_state,
)
from pipelines.loading import LoadedModel, ModelLoadError, ModelSpec, load_model
from pipelines.request import GenerationRequest
from pipelines.sd3 import SD3Generator

FAMILIES = ("sd3.5-large", "sd3.5-medium")
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
REQUEST = GenerationRequest(prompt="a lighthouse at dusk", width=64, height=64, steps=3, seed=1)
BLOCK = "model.diffusion_model.joint_blocks"


class Twin(SimpleNamespace):
    loaded: LoadedModel
    full: Path  # every component in one file
    stability: Path  # MMDiT + VAE only, named as Stability names the file
    configs: Path  # the twin's folder without any weights
    encoders: Path  # the twin's folder with the text encoders' weights only


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Twin]:
    made = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(family)
        loaded = load_model(
            ModelSpec(source=f"tiny:{family}", tiny_dir=root / "tiny", device="cpu", dtype="fp32")
        )
        loaded.pipe.save_pretrained(root / "folder")
        weights = ("*.safetensors", "*.bin")
        configs, encoders = root / "configs", root / "encoders"
        shutil.copytree(root / "folder", configs, ignore=shutil.ignore_patterns(*weights))
        shutil.copytree(root / "folder", encoders)
        for part in ("transformer", "vae"):
            for weight in (p for pattern in weights for p in (encoders / part).glob(pattern)):
                weight.unlink()
        stem = family.replace("-", "_")  # sd3.5_large, sd3.5_medium
        stability = export_single_file(
            loaded.pipe, root / f"{stem}.safetensors", include_t5=False, include_clips=False
        )
        full = export_single_file(loaded.pipe, root / f"{stem}_incl_clips_t5xxl.safetensors")
        made[family] = Twin(loaded=loaded, full=full, stability=stability, configs=configs, encoders=encoders)
    return made


def load(source: Path, config: Path | None, **kwargs: Any) -> LoadedModel:
    spec = ModelSpec(
        source=str(source),
        config=None if config is None else str(config),
        tiny_dir=source.parent / "tiny",
        device="cpu",
        dtype="fp32",
        **kwargs,
    )
    return load_model(spec)


def realigned(loaded: LoadedModel) -> LoadedModel:
    """Each weight in a fresh allocation (test_single_file.py says why: CPU kernels and alignment)."""
    with torch.no_grad():
        for name in COMPONENTS:
            module = getattr(loaded.pipe, name)
            if module is not None:
                for tensor in [*module.parameters(), *module.buffers()]:
                    tensor.data = tensor.data.clone()
    return loaded


def assert_same_weights(loaded: Any, original: Any, names: tuple[str, ...] = COMPONENTS) -> None:
    for name in names:
        expected, got = getattr(original, name).state_dict(), getattr(loaded, name).state_dict()
        assert sorted(got) == sorted(expected), name
        for key, tensor in expected.items():
            assert torch.equal(got[key], tensor), f"{name}.{key}"


def keys_and_shapes(path: Path) -> dict[str, list[int]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 (a handle is not iterable)


def test_sd35_large_has_qk_norm_in_every_block_and_no_second_attention(twins: dict[str, Twin]) -> None:
    shapes = keys_and_shapes(twins["sd3.5-large"].full)
    width, head = 32, 16  # the twin's caption_projection_dim and attention_head_dim
    for i in (0, 1):  # block 1 is the last, context_pre_only, and keeps its text-side norms
        for stream in ("x_block", "context_block"):
            for norm in ("ln_q", "ln_k"):
                assert shapes[f"{BLOCK}.{i}.{stream}.attn.{norm}.weight"] == [head]
        assert shapes[f"{BLOCK}.{i}.x_block.adaLN_modulation.1.weight"] == [6 * width, width]
    assert not any(".attn2." in k for k in shapes)
    assert f"{BLOCK}.1.context_block.attn.proj.weight" not in shapes
    contents = inspect_single_file(twins["sd3.5-large"].full)
    assert contents.family == "sd3.5-large" and contents.variant == "sd35_large"


def test_sd35_medium_has_mmditx_dual_attention_in_block_0(twins: dict[str, Twin]) -> None:
    shapes = keys_and_shapes(twins["sd3.5-medium"].full)
    width, head = 32, 16
    assert shapes[f"{BLOCK}.0.x_block.attn2.qkv.weight"] == [3 * width, width]
    assert shapes[f"{BLOCK}.0.x_block.attn2.qkv.bias"] == [3 * width]
    assert shapes[f"{BLOCK}.0.x_block.attn2.proj.weight"] == [width, width]
    assert shapes[f"{BLOCK}.0.x_block.attn2.ln_q.weight"] == shapes[f"{BLOCK}.0.x_block.attn2.ln_k.weight"]
    assert shapes[f"{BLOCK}.0.x_block.attn2.ln_q.weight"] == [head]
    # MMDiT-X's adaLN gives the second attention its own shift, scale and gate: 9 chunks, not 6.
    assert shapes[f"{BLOCK}.0.x_block.adaLN_modulation.1.weight"] == [9 * width, width]
    assert shapes[f"{BLOCK}.1.x_block.adaLN_modulation.1.weight"] == [6 * width, width]
    assert not any(k.startswith(f"{BLOCK}.1.x_block.attn2.") for k in shapes)
    assert shapes["model.diffusion_model.pos_embed"] == [1, 384 * 384, width]
    contents = inspect_single_file(twins["sd3.5-medium"].full)
    assert contents.family == "sd3.5-medium" and contents.variant == "sd35_medium"


@pytest.mark.parametrize("family", FAMILIES)
def test_stabilitys_layout_is_mmdit_and_vae_only(twins: dict[str, Twin], family: str) -> None:
    contents = inspect_single_file(twins[family].stability)
    assert contents.is_sd3 and contents.has_vae and not contents.has_text_encoders
    assert contents.family == family


@pytest.mark.parametrize("family", FAMILIES)
def test_the_export_is_the_exact_inverse_of_diffusers_converter(twins: dict[str, Twin], family: str) -> None:
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    transformer = twins[family].loaded.pipe.transformer
    state = single_file_state(twins[family].loaded.pipe, include_t5=False, include_clips=False)
    back = convert_sd3_transformer_checkpoint_to_diffusers(state)
    expected = transformer.state_dict()
    assert sorted(back) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(back[key], tensor), key


@pytest.mark.parametrize(
    ("scale", "variant"), [("sd3.5-large", "sd35_large"), ("sd3.5-medium", "sd35_medium")]
)
def test_a_full_size_export_is_what_diffusers_expects_of_sd35(scale: str, variant: str) -> None:
    # On the meta device, as for SD3 Medium in test_single_file.py: diffusers tells SD3.5 Large by its
    # 38th block and Medium by its 384-patch position table, which only the real sizes have.
    from diffusers.loaders.single_file_utils import (
        convert_sd3_transformer_checkpoint_to_diffusers,
        infer_diffusers_model_type,
    )

    models = build_components(ARCHITECTURES[scale], device="meta", dtype=torch.float16, with_t5=False)  # type: ignore[index]
    state = single_file_state(SimpleNamespace(**models), include_t5=False, include_clips=False)
    assert infer_diffusers_model_type(state) == variant == SingleFileContents(frozenset(state)).variant
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(state))
    expected = models["transformer"].state_dict()
    assert sorted(converted) == sorted(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("family", FAMILIES)
def test_a_whole_sd35_file_loads_offline_with_every_weight_equal_and_its_family(
    twins: dict[str, Twin], family: str
) -> None:
    twin = twins[family]
    loaded = load(twin.full, twin.configs)
    assert loaded.family == family and loaded.description.startswith("single-file checkpoint")
    assert_same_weights(loaded.pipe, twin.loaded.pipe)


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("family", FAMILIES)
def test_an_sd35_file_draws_the_same_image_as_its_twin(twins: dict[str, Twin], family: str) -> None:
    twin = twins[family]
    from_file = SD3Generator(realigned(load(twin.full, twin.configs))).generate(REQUEST).images[0]
    reference = load_model(
        ModelSpec(source=f"tiny:{family}", tiny_dir=twin.full.parent / "tiny", device="cpu", dtype="fp32")
    )
    from_twin = SD3Generator(realigned(reference)).generate(REQUEST).images[0]
    np.testing.assert_array_equal(from_file, from_twin)
    assert from_file.std() > 0  # an image, not a constant


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("family", FAMILIES)
def test_a_file_as_stability_ships_it_takes_all_three_text_encoders_from_the_config_folder(
    twins: dict[str, Twin], family: str
) -> None:
    # Unlike sd3_medium_incl_clips (CLIPs but no T5: a CLIP-only model), a file without any text
    # encoder keeps T5: it comes from the folder with the CLIPs.
    twin = twins[family]
    loaded = load(twin.stability, twin.encoders)
    assert loaded.pipe.text_encoder_3 is not None and loaded.family == family
    assert_same_weights(loaded.pipe, twin.loaded.pipe)


@pytest.mark.usefixtures("offline")
def test_a_file_named_large_turbo_loads_as_large_turbo(twins: dict[str, Twin]) -> None:
    twin = twins["sd3.5-large"]
    turbo = twin.stability.with_name("sd3.5_large_turbo.safetensors")
    shutil.copyfile(twin.stability, turbo)
    loaded = load(turbo, twin.encoders)
    assert loaded.family == "sd3.5-large-turbo"
    assert_same_weights(loaded.pipe, twin.loaded.pipe, ("transformer", "vae"))
    assert load(twin.stability, twin.encoders).family == "sd3.5-large"  # the same weights, another name


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize(
    ("family", "name", "repo"),
    [
        ("sd3.5-large", "sd3.5_large.safetensors", "stabilityai/stable-diffusion-3.5-large"),
        ("sd3.5-large", "sd3.5_large_turbo.safetensors", "stabilityai/stable-diffusion-3.5-large-turbo"),
        ("sd3.5-medium", "sd3.5_medium.safetensors", "stabilityai/stable-diffusion-3.5-medium"),
    ],
)
def test_without_model_config_offline_the_error_names_the_family_configs(
    twins: dict[str, Twin], family: str, name: str, repo: str, tmp_path: Path
) -> None:
    path = tmp_path / name
    shutil.copyfile(twins[family].stability, path)
    with pytest.raises(ModelLoadError) as caught:
        load(path, None)
    message = str(caught.value)
    assert "--model-config" in message and repo in message and "SD3 Medium" not in message
    assert "must hold their weights" in message  # the file has no text encoders
    assert "\n" not in message


@pytest.mark.usefixtures("offline")
def test_configs_of_another_family_are_refused_before_loading(twins: dict[str, Twin]) -> None:
    with pytest.raises(ModelLoadError) as caught:
        load(twins["sd3.5-large"].full, twins["sd3.5-medium"].configs)
    message = str(caught.value)
    assert "holds SD3.5 Large weights" in message and "describes SD3.5 Medium" in message
    assert "stabilityai/stable-diffusion-3.5-large" in message


@pytest.mark.usefixtures("offline")
def test_a_file_without_text_encoders_and_a_folder_without_their_weights_says_so(
    twins: dict[str, Twin],
) -> None:
    twin = twins["sd3.5-medium"]
    with pytest.raises(ModelLoadError) as caught:
        load(twin.stability, twin.configs)
    message = str(caught.value)
    assert "no text encoders" in message and "stabilityai/stable-diffusion-3.5-medium" in message


@pytest.mark.usefixtures("offline")
def test_a_family_setting_the_file_contradicts_is_refused(twins: dict[str, Twin]) -> None:
    with pytest.raises(ModelLoadError, match="these weights are sd3.5-medium"):
        load(twins["sd3.5-medium"].full, twins["sd3.5-medium"].configs, family="sd3.5-large")


@pytest.mark.parametrize("family", FAMILIES)
def test_the_converter_command_writes_an_sd35_folder_as_stability_ships_it(
    twins: dict[str, Twin], family: str, tmp_path: Path
) -> None:
    folder = twins[family].configs.parent / "folder"
    out = tmp_path / "converted.safetensors"
    assert main([str(folder), str(out), "--no-text-encoders", "--dtype", "fp32"]) == 0
    contents = inspect_single_file(out)
    assert contents.family == family and contents.has_vae and not contents.has_text_encoders
    transformer = twins[family].loaded.pipe.transformer
    with safe_open(str(out), framework="pt") as f:
        ln_q = f.get_tensor(f"{BLOCK}.0.x_block.attn.ln_q.weight")
    assert torch.equal(ln_q, transformer.transformer_blocks[0].attn.norm_q.weight)
