"""Single-file checkpoints as ComfyUI users keep them: written from the tiny model, loaded offline.

The files are made by `pipelines.checkpoints.export_single_file` in Stability's original key layout
and read back by diffusers' own `from_single_file` through `load_model`, with the configs taken from
a copy of the tiny folder *without any weights*, so every weight that arrives must have come
through the file. Loading runs with the Hub switched to offline mode: a download attempt fails.
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
from safetensors.torch import save_file

from pipelines.architectures import SD3_MEDIUM, build_components
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
from server.runtime import Runtime

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
REQUEST = GenerationRequest(prompt="a lighthouse at dusk", width=512, height=512, steps=10, seed=1)


@pytest.fixture(scope="module")
def original(runtime: Runtime) -> Any:
    assert isinstance(runtime.generator, SD3Generator)
    return runtime.generator.pipe


@pytest.fixture(scope="module")
def configs_only(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny folder with its configs and tokenizers but none of its weights."""
    target = tmp_path_factory.mktemp("sd3-configs") / "tiny-configs"
    shutil.copytree(tiny_dir, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return target


@pytest.fixture(scope="module")
def files(original: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("single-files")
    return {
        "with T5": export_single_file(original, folder / "tiny_incl_clips_t5xxl.safetensors"),
        "without T5": export_single_file(original, folder / "tiny_incl_clips.safetensors", include_t5=False),
    }


def load(source: Path, tiny_dir: Path, config: Path | None, **kwargs: Any) -> LoadedModel:
    spec = ModelSpec(
        source=str(source),
        config=None if config is None else str(config),
        tiny_dir=tiny_dir,
        device="cpu",
        dtype="fp32",
        **kwargs,
    )
    return load_model(spec)


def realigned(loaded: LoadedModel) -> LoadedModel:
    """The same weights, each moved to a fresh allocation.

    CPU BLAS kernels choose their code path by the address alignment of their operands, and
    weights memory-mapped from a safetensors file sit at whatever offset the file gives them. The
    same weights at two offsets then round differently in the last bit, which ten sampling steps
    can carry into a pixel differing by 1/255. Fresh allocations are all aligned alike, so what is
    left to compare is the weights themselves.
    """
    with torch.no_grad():
        for name in COMPONENTS:
            module = getattr(loaded.pipe, name)
            if module is not None:
                for tensor in [*module.parameters(), *module.buffers()]:
                    tensor.data = tensor.data.clone()
    return loaded


def assert_same_weights(loaded: Any, original: Any, name: str) -> None:
    expected, got = getattr(original, name).state_dict(), getattr(loaded, name).state_dict()
    assert sorted(got) == sorted(expected), name
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), f"{name}.{key}"


def test_the_file_has_the_original_sd3_layout(files: dict[str, Path]) -> None:
    with safe_open(str(files["with T5"]), framework="pt") as f:
        keys = set(f.keys())
        pos_embed_shape = f.get_slice("model.diffusion_model.pos_embed").get_shape()
        vae_attention_shape = f.get_slice("first_stage_model.decoder.mid.attn_1.q.weight").get_shape()
    for key in (
        "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
        "model.diffusion_model.joint_blocks.1.context_block.adaLN_modulation.1.weight",
        "model.diffusion_model.final_layer.adaLN_modulation.1.bias",
        "first_stage_model.decoder.up.0.block.0.conv1.weight",
        "first_stage_model.encoder.mid.block_1.norm1.weight",
        "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight",
        "text_encoders.clip_g.transformer.text_projection.weight",
        "text_encoders.t5xxl.transformer.shared.weight",
    ):
        assert key in keys, key
    # As in Stability's files: no CLIP-L projection (it is the identity), T5's embedding stored once,
    # the last block's text stream without output projection or MLP, and 1x1-conv VAE attention.
    assert "text_encoders.clip_l.transformer.text_projection.weight" not in keys
    assert "text_encoders.t5xxl.transformer.encoder.embed_tokens.weight" not in keys
    assert "model.diffusion_model.joint_blocks.1.context_block.attn.proj.weight" not in keys
    assert pos_embed_shape == [1, 192 * 192, 32]
    assert len(vae_attention_shape) == 4
    contents = inspect_single_file(files["without T5"])
    assert contents.is_sd3 and contents.has_clip_l and contents.has_clip_g and not contents.has_t5


def test_a_full_size_export_is_what_diffusers_expects_of_sd3_medium() -> None:
    # On the meta device: the real SD3 Medium shapes at no cost. diffusers recognises SD3 Medium by
    # the width of a context adaLN (9216) and the position table (36864 rows); the tiny model has
    # neither, so only full size shows that the layout matches what diffusers expects of a real file.
    from diffusers.loaders.single_file_utils import (
        convert_ldm_vae_checkpoint,
        convert_sd3_transformer_checkpoint_to_diffusers,
        infer_diffusers_model_type,
    )

    models = build_components(SD3_MEDIUM, device="meta", dtype=torch.float16)
    state = single_file_state(SimpleNamespace(**models))
    assert infer_diffusers_model_type(state) == "sd3" == SingleFileContents(frozenset(state)).variant
    for converted, model in (
        (convert_sd3_transformer_checkpoint_to_diffusers(dict(state)), models["transformer"]),
        (convert_ldm_vae_checkpoint(dict(state), dict(models["vae"].config)), models["vae"]),
    ):
        expected = model.state_dict()
        assert sorted(converted) == sorted(expected)
        assert all(converted[k].shape == expected[k].shape for k in expected)


@pytest.mark.usefixtures("offline")
def test_a_single_file_with_t5_loads_offline_with_every_weight_equal(
    files: dict[str, Path], original: Any, configs_only: Path, tiny_dir: Path
) -> None:
    loaded = load(files["with T5"], tiny_dir, configs_only)
    assert loaded.description.startswith("single-file checkpoint")
    for name in COMPONENTS:
        assert_same_weights(loaded.pipe, original, name)
    # The T5 input embedding is the shared table again, not a second (possibly unloaded) tensor.
    t5 = loaded.pipe.text_encoder_3
    assert t5.encoder.embed_tokens.weight.data_ptr() == t5.shared.weight.data_ptr()


@pytest.mark.usefixtures("offline")
def test_a_single_file_draws_the_same_image_as_the_diffusers_folder(
    files: dict[str, Path], configs_only: Path, tiny_dir: Path, runtime: Runtime
) -> None:
    from_file = SD3Generator(realigned(load(files["with T5"], tiny_dir, configs_only))).generate(REQUEST)
    folder = realigned(load_model(ModelSpec(source="tiny", tiny_dir=tiny_dir, device="cpu", dtype="fp32")))
    from_folder = SD3Generator(folder).generate(REQUEST)
    np.testing.assert_array_equal(from_file.images[0], from_folder.images[0])
    assert from_file.images[0].std() > 0  # an image, not a constant


@pytest.mark.usefixtures("offline")
def test_a_file_without_t5_loads_without_t5_even_when_the_config_folder_has_one(
    files: dict[str, Path], original: Any, tiny_dir: Path
) -> None:
    # The full tiny folder holds T5 weights; a file without T5 must still give a pipeline without T5.
    loaded = load(files["without T5"], tiny_dir, tiny_dir)
    assert loaded.pipe.text_encoder_3 is None and loaded.pipe.tokenizer_3 is None
    assert loaded.description.endswith("without T5")
    for name in COMPONENTS[:4]:
        assert_same_weights(loaded.pipe, original, name)
    image = SD3Generator(loaded).generate(REQUEST).images[0]
    assert image.shape == (512, 512, 3) and image.std() > 0


@pytest.mark.usefixtures("offline")
def test_t5_can_be_left_out_of_a_file_that_has_it(
    files: dict[str, Path], configs_only: Path, tiny_dir: Path
) -> None:
    loaded = load(files["with T5"], tiny_dir, configs_only, load_t5=False)
    assert loaded.pipe.text_encoder_3 is None


@pytest.mark.usefixtures("offline")
def test_without_model_config_offline_the_error_says_to_pass_one(
    files: dict[str, Path], tiny_dir: Path
) -> None:
    with pytest.raises(ModelLoadError) as caught:
        load(files["without T5"], tiny_dir, None)
    message = str(caught.value)
    assert "--model-config" in message and "stabilityai/stable-diffusion-3-medium-diffusers" in message
    assert "\n" not in message


def test_a_safetensors_file_that_is_not_sd3(tmp_path: Path, tiny_dir: Path) -> None:
    path = tmp_path / "something_else.safetensors"
    save_file({"encoder.layer.0.weight": torch.randn(4, 4), "head.bias": torch.zeros(4)}, str(path))
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion 3 checkpoint"):
        load(path, tiny_dir, None)


def test_a_unet_checkpoint_is_named_as_such(tmp_path: Path, tiny_dir: Path) -> None:
    path = tmp_path / "v1-5-pruned.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(path))
    with pytest.raises(ModelLoadError, match=r"not a Stable Diffusion 3 checkpoint.*UNet"):
        load(path, tiny_dir, None)


def test_a_truncated_file_is_one_sentence(files: dict[str, Path], tmp_path: Path, tiny_dir: Path) -> None:
    path = tmp_path / "cut.safetensors"
    path.write_bytes(files["without T5"].read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="could not be read as a checkpoint"):
        load(path, tiny_dir, None)


def test_a_config_folder_that_is_not_diffusers(
    files: dict[str, Path], tmp_path: Path, tiny_dir: Path
) -> None:
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load(files["without T5"], tiny_dir, tmp_path)


def test_the_converter_command_writes_fp16_throughout_by_default(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "converted.safetensors"
    assert main([str(tiny_dir), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    # Including T5's `wo`, which transformers itself keeps in fp32 when it loads in fp16.
    with safe_open(str(out), framework="pt") as f:
        names = f.keys()  # a safetensors handle is not iterable itself
        assert {f.get_slice(k).get_dtype() for k in names} == {"F16"}
    assert inspect_single_file(out).has_t5


def test_the_converter_command_can_leave_t5_out(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted.safetensors"
    assert main([str(tiny_dir), str(out), "--no-t5", "--dtype", "fp32"]) == 0
    contents = inspect_single_file(out)
    assert contents.is_sd3 and contents.has_vae and contents.has_clip_g and not contents.has_t5
