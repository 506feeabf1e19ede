"""The committed toy (`pipelines/toy/model/`): the files its manifest names, bit for bit, loaded by the
same code as downloaded weights (`--model toy`), in the shape tools that recognise SD3 expect."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import pipelines.toy
from pipelines.request import GenerationRequest
from pipelines.sd3 import SD3Generator
from pipelines.toy import train
from server.config import Settings
from server.runtime import load_runtime

FOLDER = pipelines.toy.MODEL_DIR
pytestmark = pytest.mark.skipif(
    not (FOLDER / "model_index.json").exists(),
    reason="the toy's weights are not in this checkout (python -m pipelines.toy.train pipelines/toy/model)",
)


def _manifest() -> dict[str, object]:
    return json.loads((FOLDER / train.MANIFEST).read_text())


def test_every_committed_file_is_the_one_its_manifest_names() -> None:
    files = _manifest()["files"]
    assert isinstance(files, dict)
    weights = [p for p in FOLDER.rglob("*") if p.is_file() and p.name != train.MANIFEST]
    on_disk = {p.relative_to(FOLDER).as_posix() for p in weights}
    assert on_disk == set(files)
    for name, digest in files.items():
        assert hashlib.sha256((FOLDER / name).read_bytes()).hexdigest() == digest, name


def test_the_manifest_records_how_to_train_it_again() -> None:
    manifest = _manifest()
    assert manifest["script"] == "pipelines.toy.train"
    assert manifest["script_version"] == train.SCRIPT_VERSION  # a script that trains differently bumps it
    config = manifest["config"]
    assert isinstance(config, dict) and config["threads"] >= 1 and config["phases"]
    gate = manifest["vae_gate"]
    assert isinstance(gate, dict) and gate["passed"] and not gate["colour_errors"]


def test_it_follows_sd3s_width_rule_so_sd3_detection_recognises_it() -> None:
    config = json.loads((FOLDER / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "SD3Transformer2DModel"
    assert config["attention_head_dim"] == 64 and config["num_attention_heads"] == config["num_layers"]
    assert config["caption_projection_dim"] == 64 * config["num_layers"]
    assert (config["patch_size"], config["in_channels"], config["out_channels"]) == (2, 16, 16)
    vae = json.loads((FOLDER / "vae" / "config.json").read_text())
    assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (16, 1.5305, 0.0609)


def test_model_toy_loads_it_through_the_serving_code_and_draws(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, model={"id": "toy", "device": "cpu"})
    runtime = load_runtime(settings)
    assert isinstance(runtime.generator, SD3Generator)
    assert str(FOLDER) in runtime.description and runtime.family == "sd3-medium"
    # 256 px: after its 512 px phase the toy no longer draws a shape at 128 px (docs/toy.md §7).
    request = GenerationRequest(prompt="a red square on a white background", width=256, height=256, steps=12)
    image = runtime.generator.generate(request).images[0]
    assert image.shape == (256, 256, 3)
    assert float(np.asarray(image, dtype=np.float64).std()) > 5.0  # a picture, not a flat fill
