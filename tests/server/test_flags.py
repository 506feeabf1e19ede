"""The command-line options derived from `Settings`: one per setting, each with its environment twin."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.core import TyperGroup
from typer.main import get_command
from typer.testing import CliRunner

from server.cli import app
from server.config import Settings
from server.flags import SettingOption, SettingsFlags, setting_options

runner = CliRunner()

# A value other than the default for every setting, as one string for the flag and the variable alike.
SAMPLES = {
    "data_dir": "/srv/sd3",
    "database_url": "sqlite:////srv/sd3/other.sqlite3",
    "host": "0.0.0.0",
    "port": "8123",
    "log_level": "debug",
    "log_format": "json",
    "instance_id": "box-1",
    "model.id": "tiny",
    "model.revision": "main",
    "model.config": "some/configs",
    "model.device": "cpu",
    "model.dtype": "bf16",
    "model.family": "sd3.5-large-turbo",
    "sampling.negative_window_wiring": "b",
    "sampling.percent_rule": "legacy",
    "sampling.sd35_negative": "window",
    "sampling.max_sequence_length": "256",
    "memory.mode": "model_offload",
    "memory.t5": "8bit",
    "memory.t5_on_cpu": "on",
    "memory.vae_tiling": "off",
    "memory.attention_slicing": "on",
    "memory.prompt_cache_mb": "64",
    "performance.compile_scope": "whole",
    "performance.attention": "sdpa",
    "performance.quantize": "int8",
    "performance.step_cache": "fast",
    "performance.compile_mode": "default",
    "performance.compile_backend": "eager",
    "performance.jpeg_quality": "75",
    "pricing.price_per_image": "0.05",
    "pricing.reference_steps": "30",
    "pricing.reference_pixels": "262144",
    "pricing.mode": "evaluations",
    "limits.max_body_bytes": "4096",
    "limits.requests_per_minute": "60",
    "limits.max_prompt_tokens": "500",
    "limits.image_max_bytes": "5000000",
    "limits.image_max_pixels": "1000000",
    "limits.img2img_max_side": "1024",
    "pricing.img2img_price_per_image": "0.01",
    "pricing.img2img_reference_steps": "30",
    "pricing.sd35_large_price_per_image": "0.02",
    "pricing.sd35_large_reference_steps": "28",
    "pricing.sd35_turbo_price_per_image": "0.005",
    "pricing.sd35_turbo_reference_steps": "4",
    "pricing.sd35_medium_price_per_image": "0.03",
    "pricing.sd35_medium_reference_steps": "40",
    "connections.header_timeout_s": "2.5",
    "connections.body_timeout_s": "12",
    "connections.keep_alive_s": "9",
    "connections.max_header_bytes": "8192",
    "connections.max_connections": "100",
    "connections.max_connections_per_client": "0",
    "jobs.result_retention_s": "60",
    "jobs.outputs_retention_s": "120",
    "queue.max_pending": "3",
    "queue.retry_after_s": "7",
    "queue.max_accepted_jobs": "10",
    "queue.max_batch_images": "4",
    "queue.max_batch_pixels": "1048576",
    "queue.batch_wait_ms": "0",
}
SWITCHES = {
    "starter_key",
    "performance.compile",
    "performance.fuse_qkv",
    "performance.warmup",
    "limits.image_url_fetch",
}
# A list is JSON in the environment (pydantic-settings), and a repeated flag on the command line.
LISTS = {
    "cors_origins": (["--cors-origins", "https://a.example"], '["https://a.example"]'),
    "limits.image_url_hosts": (["--image-url-hosts", "images.example"], '["images.example"]'),
    "model.lora": (["--lora", "hyper.safetensors:0.125"], '["hyper.safetensors:0.125"]'),
    "performance.warmup_sizes": (["--warmup-size", "768x1344"], '["768x1344"]'),
}

# Every flag `serve` and `generate` had when they were declared by hand: scripts and the README use them.
SERVE_FLAGS_BEFORE = [
    "--model",
    "-m",
    "--host",
    "--port",
    "--device",
    "--dtype",
    "--t5",
    "--no-t5",
    "--t5-on-cpu",
    "--memory-mode",
    "--vae-tiling",
    "--attention-slicing",
    "--revision",
    "--model-config",
    "--max-pending",
    "--max-batch-images",
    "--max-batch-pixels",
    "--compile",
    "--no-compile",
    "--fuse-qkv",
    "--no-fuse-qkv",
    "--warmup",
    "--no-warmup",
    "--jpeg-quality",
    "--prompt-cache-mb",
    "--requests-per-minute",
    "--header-timeout",
    "--body-timeout",
    "--keep-alive",
    "--max-header-bytes",
    "--max-connections",
    "--max-connections-per-client",
    "--data-dir",
    "--database-url",
    "--log-level",
    "--log-format",
    "--starter-key",
    "--no-starter-key",
    "--ray",
    "--replicas",
    "--ray-address",
]
GENERATE_FLAGS_BEFORE = [
    "--prompt",
    "-p",
    "--out",
    "-o",
    "--negative-prompt",
    "--samples",
    "--scheduler",
    "--steps",
    "--num-inference-steps",
    "--guidance-scale",
    "--cfg",
    "--denoise",
    "--seed",
    "--width",
    "--img-width",
    "--height",
    "--img-height",
    "--shift",
    "--modelsamplingsd3-shift",
    "--conditioningsettimesteprange-start",
    "--conditioningsettimesteprange-stop",
    "--model",
    "-m",
    "--device",
    "--dtype",
    "--t5",
    "--no-t5",
    "--t5-on-cpu",
    "--memory-mode",
    "--vae-tiling",
    "--attention-slicing",
    "--revision",
    "--model-config",
    "--data-dir",
]


class Probe(typer.Typer):
    """A command with every settings option that only records the `Settings` it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.built: list[Settings] = []

        @self.command()
        @SettingsFlags()
        def record(settings: Settings) -> None:
            self.built.append(settings)


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> Probe:
    for name in list(os.environ):
        if name.startswith("SD3_"):
            monkeypatch.delenv(name)
    return Probe()


def settings_from(probe: Probe, args: list[str], env: dict[str, str] | None = None) -> Settings:
    result = runner.invoke(probe, args, env=env)
    assert result.exit_code == 0, result.output
    return probe.built.pop()


def value_at(settings: Settings, option: SettingOption) -> Any:
    value: Any = settings
    for name in option.path:
        value = getattr(value, name)
    return value


def dotted(option: SettingOption) -> str:
    return ".".join(option.path)


def test_serve_help_at_80_columns_shows_every_setting_with_its_flag_environment_name_and_default() -> None:
    result = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    words = " ".join(result.output.replace("│", " ").split())
    for option in setting_options():
        assert option.env in words, option.env  # never cut off
        if option.secret:
            continue  # no flag: listed under "Secrets" by its variable alone
        for flag in option.flags:
            assert re.search(rf"(?<![\w-]){flag}(?![\w-])", words), flag
        if option.default is not None:
            assert f"[env var: {option.env}] [default: {option.default}]" in words, option.env
    assert "--no-t5" in words and "--ray-address" in words


def test_a_flag_and_its_environment_twin_set_the_same_field(probe: Probe) -> None:
    options = [option for option in setting_options() if not option.secret]
    assert {dotted(option) for option in options} == {*SAMPLES, *SWITCHES, *LISTS}, "a sample per setting"
    default = settings_from(probe, [])
    for option in options:
        name = dotted(option)
        if name in SWITCHES:
            args, env = [option.flags[0]], "true"
        elif name in LISTS:
            args, env = LISTS[name]
        else:
            args, env = [option.flags[0], SAMPLES[name]], SAMPLES[name]
        from_flag = value_at(settings_from(probe, args), option)
        from_env = value_at(settings_from(probe, [], {option.env: env}), option)
        assert from_flag == from_env != value_at(default, option), (name, from_flag, from_env)


def test_a_flag_wins_over_its_environment_twin_and_a_flag_left_out_leaves_it(probe: Probe) -> None:
    env = {"SD3_PORT": "9000", "SD3_MEMORY__T5": "full", "SD3_CONNECTIONS__KEEP_ALIVE_S": "7"}
    settings = settings_from(probe, ["--port", "8123", "--t5", "8bit"], env)
    assert (settings.port, settings.memory.t5, settings.connections.keep_alive_s) == (8123, "8bit", 7)
    assert settings_from(probe, ["--t5", "full", "--no-t5"], env).memory.t5 == "off"


def test_a_bad_flag_is_refused_with_the_message_of_its_bad_environment_twin(probe: Probe) -> None:
    from_flag = runner.invoke(probe, ["--device", "gpu"])
    from_env = runner.invoke(probe, [], env={"SD3_MODEL__DEVICE": "gpu"})
    assert from_flag.exit_code == from_env.exit_code == 2
    assert from_flag.output == from_env.output
    assert "Invalid settings: model.device (SD3_MODEL__DEVICE): Input should be" in from_flag.output


@pytest.mark.parametrize(
    ("command", "before"), [("serve", SERVE_FLAGS_BEFORE), ("generate", GENERATE_FLAGS_BEFORE)]
)
def test_every_flag_declared_by_hand_before_is_still_there(command: str, before: list[str]) -> None:
    group = get_command(app)
    assert isinstance(group, TyperGroup)
    click_command = group.commands[command]
    flags = {flag for param in click_command.params for flag in (*param.opts, *param.secondary_opts)}
    assert set(before) <= flags, set(before) - flags


def test_secrets_have_no_flag(tmp_path: Path) -> None:
    secrets = [option for option in setting_options() if option.secret]
    assert {option.env for option in secrets} == {"SD3_ADMIN_TOKEN", "SD3_MODEL__HF_TOKEN"}
    result = runner.invoke(app, ["serve", "--admin-token", "x", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "No such option" in result.output
