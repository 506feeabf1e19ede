"""The SD3 Medium architecture kept in the project, and the random-weight sources built from it.

Full size is only ever built on the meta device here (no memory, no time); `random:small` runs
the same building code for real, through `load_model` and the generator.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines.architectures import (
    ARCHITECTURES,
    SD3_MEDIUM,
    Scale,
    SD3Architecture,
    build_components,
    parameter_counts,
)
from pipelines.loading import ModelLoadError, ModelSpec, load_model
from pipelines.request import GenerationRequest
from pipelines.sd3 import SD3Generator

# docs/performance.md §1 and its fp16 footprint table, in parameters.
PUBLISHED = {
    "transformer": 2.028e9,
    "text_encoder_3": 4.762e9,  # T5-XXL encoder
    "text_encoder_2": 0.695e9,  # CLIP-G
    "text_encoder": 0.124e9,  # CLIP-L
}


@pytest.fixture(scope="module")
def full_counts() -> dict[str, int]:
    return parameter_counts("full")


@pytest.mark.parametrize("component", sorted(PUBLISHED))
def test_full_size_parameter_counts_match_the_published_ones(
    full_counts: dict[str, int], component: str
) -> None:
    assert full_counts[component] == pytest.approx(PUBLISHED[component], rel=0.005)


def test_the_vae_and_the_whole_pipeline_match_the_footprint_table(full_counts: dict[str, int]) -> None:
    assert full_counts["vae"] == pytest.approx(0.084e9, rel=0.01)  # the table says "~0.084 B"
    fp16_gb = 2 * sum(full_counts.values()) / 1e9
    no_t5_gb = fp16_gb - 2 * full_counts["text_encoder_3"] / 1e9
    assert fp16_gb == pytest.approx(15.4, abs=0.05) and no_t5_gb == pytest.approx(5.9, abs=0.05)


def test_full_size_builds_on_the_meta_device_with_the_real_classes_and_dtypes() -> None:
    models = build_components(SD3_MEDIUM, device="meta", dtype=torch.float16)
    transformer, t5 = models["transformer"], models["text_encoder_3"]
    assert transformer.config.num_layers == 24
    assert transformer.pos_embed.pos_embed.shape == (1, 192 * 192, 1536)
    assert all(p.is_meta for p in transformer.parameters())
    assert transformer.dtype is torch.float16
    # As a real fp16 load does: T5's `wo` projections stay in fp32 (transformers' _keep_in_fp32_modules).
    dense = t5.encoder.block[0].layer[1].DenseReluDense
    assert dense.wo.weight.dtype is torch.float32 and dense.wi_0.weight.dtype is torch.float16


@pytest.mark.parametrize("scale", sorted(ARCHITECTURES))
def test_the_components_of_each_scale_fit_together(scale: Scale) -> None:
    ARCHITECTURES[scale].check()


def test_a_mismatched_architecture_is_refused() -> None:
    broken = SD3Architecture(
        transformer={**SD3_MEDIUM.transformer, "joint_attention_dim": 2048},
        vae=SD3_MEDIUM.vae,
        clip_l=SD3_MEDIUM.clip_l,
        clip_g=SD3_MEDIUM.clip_g,
        t5=SD3_MEDIUM.t5,
    )
    with pytest.raises(ValueError, match="joint_attention_dim must equal T5's d_model"):
        broken.check()


@pytest.mark.slow  # builds the random-weight "small" SD3 and samples a 512 px image
def test_random_small_loads_and_generates_a_512_image(tmp_path: Path) -> None:
    loaded = load_model(ModelSpec(source="random:small", tiny_dir=tmp_path / "tiny", device="cpu"))
    assert loaded.description.startswith("random-weight small")
    pipe = loaded.pipe
    assert (
        pipe.text_encoder.config.hidden_act == "quick_gelu"
        and pipe.text_encoder_2.config.hidden_act == "gelu"
    )
    assert pipe.text_encoder_3.config.vocab_size == 32128 and pipe.text_encoder.config.vocab_size == 49408
    assert torch.equal(pipe.text_encoder.text_projection.weight, torch.eye(32))  # SD3's identity
    result = SD3Generator(loaded).generate(
        GenerationRequest(prompt="a lighthouse at dusk", width=512, height=512, steps=10, seed=1)
    )
    image = result.images[0]
    assert image.shape == (512, 512, 3) and image.std() > 0


def test_random_small_is_the_same_model_every_time(tmp_path: Path) -> None:
    first, second = (
        load_model(ModelSpec(source="random:small", tiny_dir=tmp_path / "tiny", device="cpu", load_t5=False))
        for _ in range(2)
    )
    assert first.pipe.text_encoder_3 is None
    for key, tensor in first.pipe.transformer.state_dict().items():
        assert torch.equal(tensor, second.pipe.transformer.state_dict()[key]), key


def test_an_unknown_random_architecture_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="random:sd3-medium or random:small"):
        load_model(ModelSpec(source="random:sd3-large", tiny_dir=tmp_path / "tiny"))
