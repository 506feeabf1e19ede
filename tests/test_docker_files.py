"""docker/ checked without a Docker engine: the Dockerfiles, compose.yaml and .dockerignore.

No engine runs in CI, so nothing here builds an image. What the linters cannot know is checked
against the project itself: every SD3_ variable the images and compose set must be a field that
`Settings` reads (a typo would be ignored silently, since Settings has extra="ignore"), every file
a build copies must exist and be in the build context, and the healthcheck must really tell a live
server from a dead one. The linters themselves run through .ci/lint-docker.sh.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from sqlalchemy.engine import make_url

from server.config import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cpu"]
COMPOSE = DOCKER / "compose.yaml"
LINT_SCRIPT = ROOT / ".ci" / "lint-docker.sh"

# Variables read by something other than Settings: the Hugging Face libraries and the postgres image.
FOREIGN_ENV = re.compile(r"HF_TOKEN|POSTGRES_(USER|PASSWORD|DB)")
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|API_KEY|CREDENTIAL", re.IGNORECASE)


# -- a small Dockerfile reader -------------------------------------------------------------------


class Instruction:
    def __init__(self, keyword: str, args: str) -> None:
        self.keyword = keyword
        self.args = args

    def json_args(self) -> list[str] | None:
        """The exec-form arguments (`["a", "b"]`), or None for the shell form."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list)
        return [str(item) for item in value]


def read_dockerfile(path: Path) -> list[list[Instruction]]:
    """Instructions per stage; stage 0 holds what comes before the first FROM (global ARGs)."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        # Docker drops comment lines even in the middle of a continued instruction.
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, f"{path.name}: a line continuation runs off the end of the file"
    stages: list[list[Instruction]] = [[]]
    for line in logical:
        keyword, _, args = line.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip())
        if instruction.keyword == "FROM":
            stages.append([])
        stages[-1].append(instruction)
    return stages


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    defaults = {}
    for instruction in instructions:
        if instruction.keyword == "ARG" and "=" in instruction.args:
            name, _, value = instruction.args.partition("=")
            defaults[name.strip()] = value.strip().strip('"')
    return defaults


def expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), text)


def env_of(instructions: list[Instruction]) -> dict[str, str]:
    """ENV KEY=VALUE pairs (the only form our Dockerfiles use)."""
    env: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ENV":
            for pair in instruction.args.split():
                name, sep, value = pair.partition("=")
                assert sep, f"ENV {instruction.args!r}: write ENV NAME=value"
                env[name] = value.strip('"')
    return env


def final_stage(path: Path) -> list[Instruction]:
    return read_dockerfile(path)[-1]


def last(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert found, f"no {keyword} in the final stage"
    return found[-1]


# -- Settings names ------------------------------------------------------------------------------


def is_settings_env_name(name: str) -> bool:
    """Whether `Settings` reads this variable: SD3_<field> or SD3_<group>__<field>."""
    if not name.startswith("SD3_"):
        return False
    parts = name[len("SD3_") :].lower().split("__")
    fields: dict[str, Any] = dict(Settings.model_fields)
    for depth, part in enumerate(parts):
        if part not in fields:
            return False
        annotation = fields[part].annotation
        if depth == len(parts) - 1:
            return True
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return False
        fields = dict(annotation.model_fields)
    return False


def test_settings_name_check_accepts_real_fields_and_rejects_typos() -> None:
    # The checks below are only as good as this function: pin both directions.
    assert is_settings_env_name("SD3_DATABASE_URL")
    assert is_settings_env_name("SD3_MODEL__ID")
    assert is_settings_env_name("sd3_model__hf_token".upper())
    assert not is_settings_env_name("SD3_MODEL_ID")  # one underscore: not the nested delimiter
    assert not is_settings_env_name("SD3_MODEL__NAME")
    assert not is_settings_env_name("SD3_HOST__NAME")  # host is not a group
    assert not is_settings_env_name("DATABASE_URL")


# -- Dockerfiles ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned_to_a_release_tag(dockerfile: Path) -> None:
    stages = read_dockerfile(dockerfile)
    global_args = arg_defaults(stages[0])
    names: set[str] = set()
    for stage in stages[1:]:
        words = stage[0].args.split()
        image = expand(words[0], global_args)
        if len(words) == 3 and words[1].upper() == "AS":
            names.add(words[2])
        if image in names:
            continue
        assert "$" not in image, f"{dockerfile.name}: FROM {words[0]} has no default to check"
        repository, sep, tag = image.rpartition(":")
        assert sep and "/" not in tag, f"{dockerfile.name}: {image} has no tag"
        # A release tag carries a version number; `latest`, `slim` or `bookworm` alone would move.
        assert re.search(r"\d+\.\d+", tag), f"{dockerfile.name}: {image} is not pinned to a release"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_as_the_unprivileged_uid_10001(dockerfile: Path) -> None:
    stage = final_stage(dockerfile)
    user = last(stage, "USER").args
    assert user.split(":")[0] == "10001", user
    # A numeric USER needs no passwd entry to run, but tools that look the user up (and the home
    # directory for caches) want one, with the same uid.
    assert any("useradd" in i.args and "--uid 10001" in i.args for i in stage if i.keyword == "RUN")
    assert [i.keyword for i in stage].index("USER") > max(
        n for n, i in enumerate(stage) if i.keyword in {"RUN", "COPY"}
    ), "USER must come after the last RUN/COPY, so that nothing later runs as root"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_serves_sd3_server_on_0_0_0_0_port_8000(dockerfile: Path) -> None:
    stage = final_stage(dockerfile)
    assert last(stage, "EXPOSE").args.split() == ["8000"]
    env = env_of(stage)
    assert env["SD3_HOST"] == "0.0.0.0"
    assert env.get("SD3_PORT", "8000") == "8000"
    assert last(stage, "ENTRYPOINT").json_args() == ["sd3-server"]
    assert last(stage, "CMD").json_args() == ["serve"]
    labels = " ".join(i.args for i in stage if i.keyword == "LABEL")
    for key in ("title", "description", "licenses", "version"):
        assert f"org.opencontainers.image.{key}=" in labels


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_model_cache_and_data_dir_are_volumes(dockerfile: Path) -> None:
    stage = final_stage(dockerfile)
    volumes = last(stage, "VOLUME").json_args()
    assert volumes is not None and {"/models", "/data"} <= set(volumes)
    env = env_of(stage)
    assert env["HF_HOME"] == "/models"
    assert env["SD3_DATA_DIR"] == "/data"
    # Named volumes copy the ownership of the image's directory: it must be the runtime user's.
    assert any("chown 10001:10001 /models /data" in i.args for i in stage if i.keyword == "RUN")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_sets_only_settings_that_exist_and_no_secret(dockerfile: Path) -> None:
    for stage in read_dockerfile(dockerfile):
        for name in env_of(stage):
            if name.startswith("SD3_"):
                assert is_settings_env_name(name), f"{dockerfile.name}: ENV {name} is no setting"
        for instruction in stage:
            if instruction.keyword in {"ENV", "ARG"}:
                names = re.findall(r"(\w+)=", instruction.args) or [instruction.args.split()[0]]
                for name in names:
                    assert not SECRET_NAME.search(name), f"{dockerfile.name}: {name} bakes a secret in"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_torch_is_pinned_and_kept_while_the_project_installs(dockerfile: Path) -> None:
    builder = read_dockerfile(dockerfile)[1]
    args = arg_defaults(builder)
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"])
    assert args["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/")
    runs = [i.args for i in builder if i.keyword == "RUN"]
    torch_run = next(r for r in runs if '"torch==${TORCH_VERSION}"' in r)
    assert '--index-url "${TORCH_INDEX_URL}"' in torch_run
    project_run = next(r for r in runs if '".[postgres]"' in r)
    assert "--constraint" in project_run and "torch==${TORCH_VERSION}" in project_run


def dockerignore_reincluded() -> list[str]:
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] == "*", ".dockerignore must start by leaving everything out"
    return [p[1:].rstrip("/") for p in patterns if p.startswith("!")]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_path_exists_and_is_in_the_build_context(dockerfile: Path) -> None:
    reincluded = dockerignore_reincluded()
    for stage in read_dockerfile(dockerfile):
        for instruction in stage:
            if instruction.keyword != "COPY" or "--from=" in instruction.args:
                continue
            *sources, _destination = instruction.args.split()
            for source in sources:
                assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: no such path"
                assert source.rstrip("/") in reincluded, f".dockerignore leaves {source} out of the context"


def test_build_context_leaves_out_venv_git_data_and_caches() -> None:
    reincluded = dockerignore_reincluded()
    for path in (".venv", ".git", "sd3-data", "tests", ".pytest_cache", "docker", ".ci"):
        assert path not in reincluded
    # Inside the folders that are sent, leftovers are still excluded.
    text = (ROOT / ".dockerignore").read_text()
    for pattern in ("**/__pycache__", "**/.pytest_cache", "**/sd3-data", "**/.env"):
        assert pattern in text.splitlines()


class HealthHandler(http.server.BaseHTTPRequestHandler):
    """A stand-in for sd3-server's /health."""

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HealthHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def unused_port() -> int:
    """A loopback port that nothing listens on: bound by us, then released."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_healthcheck_passes_on_a_live_server_and_fails_without_one(
    dockerfile: Path, health_server: int
) -> None:
    healthcheck = last(final_stage(dockerfile), "HEALTHCHECK").args
    assert "--start-period=" in healthcheck
    command = json.loads(healthcheck[healthcheck.index("CMD") + len("CMD") :].strip())
    assert command[0] == "python", "the healthcheck must use a program the image has (no curl)"
    # Run the very command the image runs, with this interpreter, against a stand-in /health.
    argv = [sys.executable, *command[1:]]
    env = {**os.environ, "SD3_PORT": str(health_server)}
    assert subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode == 0
    env["SD3_PORT"] = str(unused_port())
    assert subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode != 0


# -- compose.yaml --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def strings_in(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from strings_in(key)
            yield from strings_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings_in(item)


def interpolated_names(text: str) -> list[str]:
    # $$ is Compose's escape for a literal $ (expanded later by a container's shell): not ours.
    return re.findall(r"(?<!\$)\$\{?([A-Za-z_][A-Za-z0-9_]*)", text.replace("$$", ""))


def test_compose_uses_only_variables_sd3_server_or_postgres_read(compose: dict[str, Any]) -> None:
    names: set[str] = set()
    for service in compose["services"].values():
        environment = service.get("environment", {})
        assert isinstance(environment, dict), "write environment as a mapping"
        names.update(environment)
    for text in strings_in(compose):
        names.update(interpolated_names(text))
    assert names, "found no variables at all: the reader is broken"
    for name in sorted(names):
        assert is_settings_env_name(name) or FOREIGN_ENV.fullmatch(name), f"{name}: no setting reads it"


def test_compose_builds_from_dockerfiles_that_exist(compose: dict[str, Any]) -> None:
    built = {}
    for name, service in compose["services"].items():
        if "build" in service:
            context = (COMPOSE.parent / service["build"]["context"]).resolve()
            assert (context / "pyproject.toml").is_file(), f"{name}: the context must be the repository root"
            dockerfile = context / service["build"]["dockerfile"]
            assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
            built[name] = dockerfile
    assert built == {"sd3-server": DOCKER / "Dockerfile", "sd3-server-cpu": DOCKER / "Dockerfile.cpu"}


def test_compose_references_only_declared_services_and_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    declared_volumes = set(compose.get("volumes") or {})
    used_volumes = set()
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on {dependency}, which is not a service"
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if not source.startswith((".", "/", "~")):
                assert source in declared_volumes, f"{name}: volume {source} is not declared"
                used_volumes.add(source)
        if "image" in service and "build" not in service:
            tag = service["image"].rpartition(":")[2]
            assert re.search(r"\d+\.\d+", tag), f"{name}: {service['image']} is not pinned to a release"
    assert declared_volumes == used_volumes, "a declared volume is never mounted"


def test_server_keeps_models_and_data_on_volumes_and_waits_for_healthy_postgres(
    compose: dict[str, Any],
) -> None:
    postgres = compose["services"]["postgres"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    instance_ids = set()
    for name in ("sd3-server", "sd3-server-cpu"):
        service = compose["services"][name]
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        targets = {mount.split(":")[1] for mount in service["volumes"]}
        assert {"/models", "/data"} <= targets
        assert "127.0.0.1:8000:8000" in service["ports"]
        # Set explicitly: a container's host name changes when it is recreated (see compose.yaml).
        instance_ids.add(service["environment"]["SD3_INSTANCE_ID"])
    assert len(instance_ids) == 2, "two servers must never share an instance id"


def test_gpu_server_reserves_an_nvidia_gpu(compose: dict[str, Any]) -> None:
    devices = compose["services"]["sd3-server"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device["capabilities"] and device["driver"] == "nvidia" for device in devices)
    assert "deploy" not in compose["services"]["sd3-server-cpu"]
    assert compose["services"]["sd3-server-cpu"]["profiles"] == ["cpu"]


def test_database_url_reaches_the_postgres_service_and_settings_accept_it(compose: dict[str, Any]) -> None:
    template = compose["services"]["sd3-server"]["environment"]["SD3_DATABASE_URL"]
    # Interpolate as Compose does, with a password a user would set and the defaults for the rest.
    values = {"POSTGRES_PASSWORD": "0123abcd"}

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(3)
        return values.get(name, default if default is not None and match.group(2) == ":-" else "")

    url_text = re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", substitute, template)
    settings = Settings(database_url=url_text)
    url = make_url(settings.resolved_database_url)
    assert url.drivername == "postgresql+psycopg"
    assert url.host == "postgres" and url.host in compose["services"]
    assert url.password == "0123abcd"
    postgres_env = compose["services"]["postgres"]["environment"]
    assert url.username == re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", postgres_env["POSTGRES_USER"])
    assert url.database == re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", postgres_env["POSTGRES_DB"])


def test_compose_commits_no_password(compose: dict[str, Any]) -> None:
    # Required from docker/.env or the shell, never defaulted in the committed file.
    password = compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert password.startswith("${POSTGRES_PASSWORD:?")
    for service in compose["services"].values():
        for name, value in service.get("environment", {}).items():
            if SECRET_NAME.search(name):
                assert str(value).startswith("${"), f"{name} has a committed value"


# -- the linters ---------------------------------------------------------------------------------


def linter(name: str) -> str | None:
    # The venv's bin first: pytest may run from a venv that is not activated.
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else shutil.which(name)


def test_hadolint_and_docker_compose_accept_docker_files() -> None:
    if not (linter("hadolint") and linter("docker-compose")):
        message = "hadolint / docker-compose not installed: run bash .ci/lint-docker.sh"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs them; missing there means the set-up is broken
        pytest.skip(message)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", str(LINT_SCRIPT), "--tools-only"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
