"""SD3.5 Large / Large Turbo / Medium beside SD3 Medium: their architectures, how a loaded model's
family is told, and the tiny twins that run each family's path on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines.architectures import ARCHITECTURES, Scale, build_components, parameter_counts
from pipelines.families import FamilyMismatch, expected_family, resolve_family, structural_family
from pipelines.loading import ModelLoadError, ModelSpec, load_model
from pipelines.memory import needs_gib, plan_memory
from pipelines.options import FamilyChoice
from pipelines.request import GenerationRequest
from pipelines.sd3 import SD3Generator


@pytest.mark.parametrize(
    ("scale", "family"),
    [
        ("full", "sd3-medium"),
        ("small", "sd3-medium"),
        ("sd3.5-large", "sd3.5-large"),
        ("sd3.5-large-small", "sd3.5-large"),
        ("sd3.5-medium", "sd3.5-medium"),
        ("sd3.5-medium-small", "sd3.5-medium"),
    ],
)
def test_the_structure_tells_the_family_at_any_size(scale: Scale, family: str) -> None:
    assert structural_family(ARCHITECTURES[scale].transformer) == family


def test_full_size_sd35_transformers_have_their_published_sizes() -> None:
    # Stability's model cards: SD3.5 Large 8.1 B parameters; Medium's MMDiT-X 2.2 B (diffusers'
    # transformer alone; the card's 2.5 B counts more than the transformer).
    assert parameter_counts("sd3.5-large")["transformer"] == pytest.approx(8.06e9, rel=0.005)
    assert parameter_counts("sd3.5-medium")["transformer"] == pytest.approx(2.24e9, rel=0.005)


def test_sd35_medium_has_dual_attention_in_its_first_13_blocks_and_a_384_patch_table() -> None:
    transformer = build_components(ARCHITECTURES["sd3.5-medium"], device="meta", dtype=torch.bfloat16)[
        "transformer"
    ]
    dual = [block.attn2 is not None for block in transformer.transformer_blocks]
    assert dual == [True] * 13 + [False] * 11
    assert transformer.pos_embed.pos_embed.shape[1] == 384 * 384


def test_turbo_is_large_told_apart_by_a_setting_or_its_name() -> None:
    large = ARCHITECTURES["sd3.5-large"].transformer
    assert resolve_family(large, "auto", source="stabilityai/stable-diffusion-3.5-large") == "sd3.5-large"
    turbo_id = "stabilityai/stable-diffusion-3.5-large-turbo"
    assert resolve_family(large, "auto", source=turbo_id) == "sd3.5-large-turbo"
    assert (
        resolve_family(large, "auto", source="/models/sd3.5_large_turbo.safetensors") == "sd3.5-large-turbo"
    )
    assert resolve_family(large, "sd3.5-large-turbo", source="/models/mine") == "sd3.5-large-turbo"
    assert resolve_family(large, "sd3.5-large", source=turbo_id) == "sd3.5-large"  # the setting wins


@pytest.mark.parametrize("declared", ["sd3-medium", "sd3.5-medium"])
def test_a_family_setting_the_weights_contradict_is_refused(declared: FamilyChoice) -> None:
    with pytest.raises(FamilyMismatch, match="these weights are sd3.5-large"):
        resolve_family(ARCHITECTURES["sd3.5-large"].transformer, declared, source="x")


@pytest.mark.parametrize(
    ("source", "family"),
    [
        ("tiny:sd3.5-large", "sd3.5-large"),
        ("tiny:sd3.5-large-turbo", "sd3.5-large-turbo"),
        ("tiny:sd3.5-medium", "sd3.5-medium"),
    ],
)
def test_each_tiny_twin_loads_as_its_family_and_generates(tmp_path: Path, source: str, family: str) -> None:
    loaded = load_model(ModelSpec(source=source, tiny_dir=tmp_path / "tiny", device="cpu"))
    assert loaded.family == family and "twin" in loaded.description
    assert loaded.pipe.transformer.config.qk_norm == "rms_norm"
    image = (
        SD3Generator(loaded)
        .generate(GenerationRequest(prompt="a fox", width=64, height=64, steps=2))
        .images[0]
    )
    assert image.shape == (64, 64, 3)


def test_tiny_sd3_medium_is_the_tiny_model_and_other_twins_are_named(tmp_path: Path) -> None:
    loaded = load_model(ModelSpec(source="tiny:sd3-medium", tiny_dir=tmp_path / "tiny", device="cpu"))
    assert loaded.family == "sd3-medium" and loaded.description.startswith("tiny random-weight SD3")
    with pytest.raises(ModelLoadError, match="tiny:sd3.5-large"):
        load_model(ModelSpec(source="tiny:sd4", tiny_dir=tmp_path / "tiny", device="cpu"))


def test_a_family_setting_that_does_not_fit_the_weights_stops_the_load(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="set the family to sd3-medium or auto"):
        load_model(ModelSpec(source="tiny", tiny_dir=tmp_path / "tiny", device="cpu", family="sd3.5-medium"))


@pytest.mark.parametrize(
    ("source", "family"),
    [
        ("stabilityai/stable-diffusion-3-medium-diffusers", "sd3-medium"),
        ("stabilityai/stable-diffusion-3.5-large", "sd3.5-large"),
        ("stabilityai/stable-diffusion-3.5-large-turbo", "sd3.5-large-turbo"),
        ("stabilityai/stable-diffusion-3.5-medium", "sd3.5-medium"),
        ("/models/sd3.5_large_turbo.safetensors", "sd3.5-large-turbo"),
        ("/models/sd3_medium_incl_clips.safetensors", "sd3-medium"),
        ("tiny:sd3.5-medium", "sd3.5-medium"),
        ("random:sd3.5-large", "sd3.5-large"),
        ("tiny", "sd3-medium"),
    ],
)
def test_the_family_is_known_before_loading_for_the_memory_plan(source: str, family: str) -> None:
    assert expected_family(source, "auto") == family
    assert expected_family(source, "sd3.5-medium") == "sd3.5-medium"  # the setting wins


def test_a_local_folder_tells_its_family_by_its_transformer_config(tmp_path: Path) -> None:
    (tmp_path / "transformer").mkdir()
    config = dict(ARCHITECTURES["sd3.5-medium-small"].transformer)
    config["dual_attention_layers"] = list(config["dual_attention_layers"])
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(config))
    assert expected_family(str(tmp_path), "auto") == "sd3.5-medium"


def test_sd35_large_needs_more_memory_for_each_plan_and_medium_about_the_same() -> None:
    medium, large, medium35 = needs_gib("sd3-medium"), needs_gib("sd3.5-large"), needs_gib("sd3.5-medium")
    assert medium["full"][0] == ("device", False, 20.0)  # SD3 Medium's table, unchanged
    for mode in medium:
        for ours, theirs, m35 in zip(medium[mode], large[mode], medium35[mode], strict=True):
            assert theirs[:2] == ours[:2] and theirs[2] >= ours[2] + 6  # + 11 GiB of weights, or T5's peak
            assert ours[2] <= m35[2] <= ours[2] + 1
    # A 24 GiB card holds SD3 Medium whole; SD3.5 Large only by model offload.
    cuda, gib = torch.device("cuda"), 24 * 2**30
    assert plan_memory(mode="auto", device=cuda, free_bytes=gib).placement == "device"
    assert (
        plan_memory(mode="auto", device=cuda, free_bytes=gib, family="sd3.5-large").placement
        == "model_offload"
    )
