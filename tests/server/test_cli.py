"""The `sd3-server` command: keys and credits for scripts, and one image without HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import huggingface_hub.constants
import pytest
from PIL import Image
from pydantic import ValidationError
from typer.testing import CliRunner

from server.cli import app
from server.config import Settings
from server.ledger import Ledger

runner = CliRunner()
# `serve` configures logging onto CliRunner's stream, which is closed after each invoke.
pytestmark = pytest.mark.usefixtures("restored_logging")


def test_keys_create_prints_the_key_alone_on_the_last_line(tmp_path: Path) -> None:
    # The real console script, as a user's shell script would capture it: KEY=$(sd3-server keys create ...)
    env = {**os.environ, "SD3_DATA_DIR": str(tmp_path)}
    script = Path(sys.executable).with_name("sd3-server")
    done = subprocess.run(
        [str(script), "keys", "create", "--name", "alice", "--credits", "12.5"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    key = done.stdout.strip().splitlines()[-1]
    assert key.startswith("sd3_") and " " not in key
    # It says which ledger the key went into, so a key made for another data folder is easy to spot.
    assert f"Ledger: {tmp_path / 'ledger.sqlite3'}" in " ".join(done.stderr.split())
    ledger = Ledger(Settings(data_dir=tmp_path).resolved_database_url)
    (record,) = ledger.list_keys()
    assert (record.name, record.balance) == ("alice", Decimal("12.5"))
    assert key not in (tmp_path / "ledger.sqlite3").read_bytes().decode("latin-1")


def test_keys_list_and_credits_add(tmp_path: Path) -> None:
    opts = ["--data-dir", str(tmp_path)]
    assert runner.invoke(app, ["keys", "create", "--name", "bob", "--credits", "1", *opts]).exit_code == 0
    added = runner.invoke(app, ["credits", "add", "bob", "2.25", *opts])
    assert added.exit_code == 0 and added.stdout.strip().splitlines()[-1] == "3.25"
    listing = runner.invoke(app, ["keys", "list", *opts])
    assert listing.exit_code == 0 and "bob" in listing.stdout and "3.25" in listing.stdout
    assert runner.invoke(app, ["credits", "add", "nobody", "1", *opts]).exit_code == 1
    assert runner.invoke(app, ["keys", "create", "--name", "bob", *opts]).exit_code == 1
    assert runner.invoke(app, ["credits", "add", "bob", "lots", *opts]).exit_code == 2


def test_keys_disable_and_enable(tmp_path: Path) -> None:
    opts = ["--data-dir", str(tmp_path)]
    runner.invoke(app, ["keys", "create", "--name", "carol", *opts])
    assert runner.invoke(app, ["keys", "disable", "carol", *opts]).exit_code == 0
    assert not Ledger(Settings(data_dir=tmp_path).resolved_database_url).list_keys()[0].enabled
    assert runner.invoke(app, ["keys", "enable", "carol", *opts]).exit_code == 0


def test_generate_writes_the_images(tmp_path: Path, data_dir: Path, tiny_dir: Path) -> None:
    out = tmp_path / "out.jpg"
    result = runner.invoke(
        app,
        [
            "generate",
            "--prompt",
            "a panda",
            "--out",
            str(out),
            "--model",
            "tiny",
            "--data-dir",
            str(data_dir),
            "--width",
            "512",
            "--height",
            "520",
            "--steps",
            "10",
            "--seed",
            "7",
            "--samples",
            "2",
            "--scheduler",
            "Euler",
        ],
    )
    assert result.exit_code == 0, result.output
    for path in (tmp_path / "out-1.jpg", tmp_path / "out-2.jpg"):
        with Image.open(path) as image:
            assert image.size == (512, 520)


def test_generate_rejects_what_the_api_rejects(tmp_path: Path) -> None:
    result = runner.invoke(app, ["generate", "--prompt", "x", "--width", "1001", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "img_width" in result.output and "multiple of 8" in result.output


def test_generate_prints_the_image_path_and_no_import_narration(
    tmp_path: Path, data_dir: Path, tiny_dir: Path
) -> None:
    # A fresh process: torchao (which diffusers imports wherever it is installed) narrates its import
    # once per process, which in this one has already happened.
    script = Path(sys.executable).with_name("sd3-server")
    out = tmp_path / "plain.jpg"
    args = ["generate", "--model", "tiny", "--data-dir", str(data_dir), "--prompt", "x", "--out", str(out)]
    done = subprocess.run(
        [str(script), *args, "--steps", "10", "--width", "512", "--height", "512"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert done.stdout.strip() == str(out) and out.stat().st_size > 0
    assert "Failed to load" not in done.stderr and "register_constant" not in done.stderr, done.stderr


def test_generate_with_an_image_runs_img2img_at_the_image_size(
    tmp_path: Path, data_dir: Path, tiny_dir: Path
) -> None:
    source = Path(__file__).parent.parent / "data" / "images" / "rotated_exif.jpg"
    out = tmp_path / "edit.jpg"
    common = ["--model", "tiny", "--data-dir", str(data_dir), "--image", str(source), "--seed", "3"]
    args = ["generate", "--prompt", "a boat", "--out", str(out), *common]
    result = runner.invoke(app, [*args, "--strength", "0.5", "--steps", "3", "--scheduler", "euler"])
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.size == (96, 72)  # the photo upright (EXIF), already on the 8 px grid
    first = out.read_bytes()
    again = runner.invoke(app, [*args, "--strength", "0.5", "--steps", "3", "--scheduler", "euler"])
    assert again.exit_code == 0 and out.read_bytes() == first


def test_generate_with_an_image_refuses_what_the_api_refuses(tmp_path: Path) -> None:
    opts = ["generate", "--prompt", "x", "--data-dir", str(tmp_path)]
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    result = runner.invoke(app, [*opts, "--image", str(not_an_image)])
    assert result.exit_code == 2 and "could not be decoded" in result.output
    picture = Path(__file__).parent.parent / "data" / "images" / "landscape.png"
    result = runner.invoke(app, [*opts, "--image", str(picture), "--strength", "1.5"])
    assert result.exit_code == 2 and "strength" in result.output
    result = runner.invoke(app, [*opts, "--image", str(tmp_path / "missing.png")])
    assert result.exit_code == 2 and "Cannot read" in result.output


def test_serve_with_a_missing_model_fails_in_one_sentence(tmp_path: Path) -> None:
    result = runner.invoke(app, ["serve", "--model", str(tmp_path / "nowhere"), "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "Cannot load the model" in result.output and "Traceback" not in result.output


def test_serve_without_a_model_says_how_to_get_the_weights_and_how_to_run_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Offline, as on a laptop on a train (and so that no test ever downloads): not in the cache.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for command in (["serve"], ["generate", "--prompt", "x", "--out", str(tmp_path / "x.jpg")]):
        result = runner.invoke(app, [*command, "--data-dir", str(tmp_path)])
        assert result.exit_code == 2, result.output
        message = " ".join(result.output.split())  # rich wraps at the terminal width
        assert "HF_HUB" not in message and "stacktrace" not in message and "Traceback" not in message
        for needed in ("licence", "HF_TOKEN", "--model tiny"):
            assert needed in message, message


def test_the_default_data_folder_does_not_depend_on_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `keys create` run from one folder and `serve` from another must find the same ledger.
    monkeypatch.delenv("SD3_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))  # where platformdirs puts it on Linux
    folders = set()
    for cwd in (tmp_path / "one", tmp_path / "two"):
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        folders.add(Settings().data_dir)
    assert folders == {tmp_path / "xdg" / "sd3-server"}


def test_credits_add_refuses_a_huge_exponent_at_once(tmp_path: Path) -> None:
    opts = ["--data-dir", str(tmp_path)]
    assert runner.invoke(app, ["keys", "create", "--name", "dora", *opts]).exit_code == 0
    started = time.perf_counter()
    for command in (
        ["credits", "add", "dora", "1e999999999"],
        ["keys", "create", "--name", "eve", "--credits", "1e-999999999"],
    ):
        result = runner.invoke(app, [*command, *opts])
        assert result.exit_code == 2 and "Invalid amount" in result.output
    assert time.perf_counter() - started < 30  # minutes of CPU before the exponent was bounded
    assert [key.name for key in Ledger(Settings(data_dir=tmp_path).resolved_database_url).list_keys()] == [
        "dora"
    ]


def test_credits_add_past_the_maximum_balance_is_refused_and_the_audit_stays_ok(tmp_path: Path) -> None:
    # The report: 2 x 9e12 overflowed 2^63 micro-credits, was stored as a REAL and crashed the audit.
    opts = ["--data-dir", str(tmp_path)]
    assert runner.invoke(app, ["keys", "create", "--name", "rich", *opts]).exit_code == 0
    assert runner.invoke(app, ["credits", "add", "rich", "600000000", *opts]).exit_code == 0
    refused = runner.invoke(app, ["credits", "add", "rich", "600000000", *opts])
    assert refused.exit_code == 2 and "maximum of 1000000000" in refused.output
    assert runner.invoke(app, ["credits", "add", "rich", "9000000000000", *opts]).exit_code == 2
    audit = runner.invoke(app, ["credits", "audit", *opts])
    assert audit.exit_code == 0 and "600000000" in audit.stdout


@pytest.mark.parametrize("name", ["[/]", "acme[prod]", "[bold]boss", "team/a"])
def test_key_names_that_look_like_markup_are_printed_as_they_are(tmp_path: Path, name: str) -> None:
    opts = ["--data-dir", str(tmp_path)]
    created = runner.invoke(app, ["keys", "create", "--name", name, "--credits", "1", *opts])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("sd3_")  # the plaintext, shown once, is not lost
    assert f"Created key {name!r}" in created.output
    for command in (["keys", "list"], ["credits", "audit"]):
        result = runner.invoke(app, [*command, *opts])
        assert result.exit_code == 0, result.output
        assert name in result.stdout
    for command in (["keys", "disable", name], ["credits", "add", name, "1"]):
        assert runner.invoke(app, [*command, *opts]).exit_code == 0
    taken = runner.invoke(app, ["keys", "create", "--name", name, *opts])
    assert taken.exit_code == 1 and f"A key named {name!r} already exists" in taken.output


def test_key_names_with_control_characters_are_refused(tmp_path: Path) -> None:
    result = runner.invoke(app, ["keys", "create", "--name", "evil\nkey=admin", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "control characters" in result.output


def test_serve_refuses_a_negative_price_in_one_sentence(tmp_path: Path) -> None:
    # A model that does not exist: had the price been accepted, the command would stop there instead.
    result = runner.invoke(
        app,
        ["serve", "--model", str(tmp_path / "nowhere"), "--data-dir", str(tmp_path)],
        env={"SD3_PRICING__PRICE_PER_IMAGE": "-0.01"},
    )
    assert result.exit_code == 2
    assert "Invalid settings: pricing.price_per_image (SD3_PRICING__PRICE_PER_IMAGE)" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


@pytest.mark.parametrize(
    "env",
    [
        {"SD3_PRICING__PRICE_PER_IMAGE": "1e-999999999"},
        {"SD3_PRICING__PRICE_PER_IMAGE": "NaN"},
        {"SD3_PRICING__REFERENCE_STEPS": "0"},
    ],
)
def test_prices_that_would_fail_every_request_are_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()
