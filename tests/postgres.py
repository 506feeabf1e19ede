"""Where the PostgreSQL tests find their server, and why they may not skip in CI."""

from __future__ import annotations

import os

import pytest


def postgres_url_or_skip() -> str:
    """The test database's URL; skips without one, or fails under CI, where skipping would hide it."""
    url = os.environ.get("SD3_TEST_POSTGRES_URL")
    reason = None
    if not url:
        reason = "SD3_TEST_POSTGRES_URL is not set (run `bash .ci/postgres.sh; source .ci/postgres.env`)"
    else:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            reason = 'psycopg is not installed (pip install -e ".[postgres]")'
    if reason is None:
        assert url is not None
        return url
    if os.environ.get("CI"):
        pytest.fail(f"CI must test PostgreSQL, but {reason}")
    pytest.skip(reason)
