"""A broken ledger database: `/ready` says so, and the logs of its errors carry no key hash.

The database is a real SQLite file, really corrupted: the pages of the key table and its indexes
are overwritten, the rest is left intact. The migrations (which read only their own table) and the
server's start still pass, so the server runs while every authenticated request fails: the case
where a readiness probe that only looked at the queue said "ready".
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from server.config import Settings
from server.keys import hash_key
from server.ledger import Ledger
from server.logs import configure_logging
from server.runtime import Runtime
from tests.databases import migrated
from tests.live import SLUG, SMALL, LiveServer, live_server


def corrupt_the_key_table(database: Path) -> None:
    with sqlite3.connect(database) as conn:
        # Everything into the main file first, so that the overwritten pages are the ones read.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        roots = [
            row[0] for row in conn.execute("SELECT rootpage FROM sqlite_master WHERE tbl_name = 'api_keys'")
        ]
    conn.close()
    assert len(roots) >= 2  # the table and its unique indexes
    with database.open("r+b") as file:
        for root in roots:
            file.seek((root - 1) * page_size)
            file.write(b"\xa5" * page_size)


@dataclass
class Broken:
    live: LiveServer
    key: str  # created before the corruption


@pytest.fixture(scope="module")
def broken(
    settings: Settings, runtime: Runtime, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Broken]:
    database = tmp_path_factory.mktemp("broken") / "ledger.sqlite3"
    url = f"sqlite:///{database}"
    ledger = Ledger(migrated(url))
    _, key = ledger.create_key(name="before", credits=Decimal("1"))
    ledger.close()
    corrupt_the_key_table(database)
    for live in live_server(settings.model_copy(update={"database_url": url}), runtime):
        yield Broken(live, key)


def test_ready_is_503_naming_a_corrupted_database(broken: Broken, live: LiveServer) -> None:
    assert httpx.get(f"{live.base_url}/ready").json()["database"] == "ok"  # a healthy one, for contrast
    # What the probe must stand for: every request with a key fails.
    # DatabaseUnavailable: a JSON 503, retry later.
    assert broken.live.post({"prompt": "x", **SMALL}, key=broken.key).status_code == 503
    response = httpx.get(f"{broken.live.base_url}/ready", timeout=30)
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["ready"] is False
    assert body["database"] == "the database failed: database disk image is malformed"
    assert httpx.get(f"{broken.live.base_url}/health").status_code == 200  # alive, not ready


def test_database_errors_are_logged_without_their_parameters(
    broken: Broken, restored_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(level="info", fmt="json")
    response = broken.live.post({"prompt": "x", **SMALL}, key=broken.key, path=f"/v1/{SLUG}")
    assert response.status_code == 503 and response.headers["content-type"] == "application/json"
    logged = capsys.readouterr().err
    lines = [json.loads(line) for line in logged.splitlines() if line.startswith("{")]
    # The failed key lookup was logged, statement and all ...
    assert "database disk image is malformed" in logged and "WHERE api_keys.key_hash" in logged, lines
    # ... but not the value it looked for.
    assert hash_key(broken.key) not in logged
    assert broken.key not in logged
