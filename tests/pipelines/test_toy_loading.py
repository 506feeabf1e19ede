"""A folder written by the toy training script loads through the real loading code and generates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pipelines.toy
from pipelines.loading import ModelLoadError, ModelSpec, load_model
from pipelines.request import GenerationRequest
from pipelines.sd3 import SD3Generator
from pipelines.toy import train
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
