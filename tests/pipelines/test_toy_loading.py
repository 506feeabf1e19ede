"""A folder written by the toy training script loads through the real loading code and generates."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import pipelines.toy
from pipelines.loading import ModelLoadError, ModelSpec, load_model
from pipelines.request import GenerationRequest
from pipelines.sd3 import SD3Generator
from pipelines.tiny import build_tiny_pipeline
from pipelines.toy import train, world
from tests.pipelines.test_toy_train import TINY


def _quiet(_: str) -> None:
    pass


def test_a_trained_toy_folder_loads_as_model_toy_and_generates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "model"
    train.train(TINY, folder, log=_quiet)
    monkeypatch.setattr(pipelines.toy, "MODEL_DIR", folder)
    loaded = load_model(ModelSpec(source="toy", tiny_dir=tmp_path / "tiny", device="cpu"))
    assert "toy" in loaded.description
    result = SD3Generator(loaded).generate(
        GenerationRequest(prompt="a red circle on a blue background", width=64, height=64, steps=2, seed=1)
    )
    (image,) = result.images
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8


def test_model_toy_without_its_weights_says_how_to_train_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipelines.toy, "MODEL_DIR", tmp_path / "absent")
    with pytest.raises(ModelLoadError, match="pipelines.toy.train"):
        load_model(ModelSpec(source="toy", tiny_dir=tmp_path / "tiny", device="cpu"))


def test_a_toy_trained_on_word_tokens_is_served_with_the_conditioning_it_trained_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    cfg = dataclasses.replace(TINY, words=True, text_residual_scale=0.5)
    folder = tmp_path / "model"
    manifest = train.train(cfg, folder, log=_quiet)
    assert manifest["config"]["words"] is True and manifest["config"]["text_residual_scale"] == 0.5
    monkeypatch.setattr(pipelines.toy, "MODEL_DIR", folder)
    spec = ModelSpec(source="toy", tiny_dir=tmp_path / "tiny", device="cpu", dtype="fp32")
    generator = SD3Generator(load_model(spec))
    caption = "an orange triangle at the top right on a purple background"
    assert len(generator.pipe.tokenizer_3.tokenize(caption)) == len(caption.split())
    # The folder's encoders are the ones the transformer was trained on.
    served = generator.encode(caption)
    trained = train.CaptionBank(build_tiny_pipeline(world.vocabulary(), 0.5)).get([caption])
    assert torch.equal(served.context, trained[0])
    # The pooled vector passes CLIP-G's projection, a matmul whose kernel may round differently
    # after a reload: equal to float32 rounding.
    torch.testing.assert_close(served.pooled, trained[1], rtol=1e-6, atol=1e-6)
