"""A folder written by the toy training script loads through the real loading code and generates."""

from __future__ import annotations

import hashlib
import json
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


def test_the_committed_toy_is_the_trained_one_its_manifest_describes(tmp_path: Path) -> None:
    folder = pipelines.toy.MODEL_DIR
    manifest = json.loads((folder / train.MANIFEST).read_text())
    assert manifest["script"] == "pipelines.toy.train" and manifest["vae_gate"]["passed"] is True
    assert manifest["config"]["enforce_gate"] is True  # not a smoke-test run
    on_disk = {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != train.MANIFEST
    }
    assert on_disk == set(manifest["files"])
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    total = sum((folder / name).stat().st_size for name in manifest["files"])
    assert total < 50 * 2**20  # tens of MB at most: it lives in the repository
    # Through the same loading code as downloaded weights, by name.
    loaded = load_model(ModelSpec(source="toy", tiny_dir=tmp_path / "tiny", device="cpu"))
    assert str(folder) in loaded.description
    assert loaded.pipe.transformer.config.num_layers == manifest["config"]["depth"]
