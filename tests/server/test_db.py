"""server/db: the bottom layer of persistence, usable without any repository."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from server.db.engine import create_database_engine, sqlite_path

REPOSITORIES = ("server.ledger", "server.job_store", "server.auth", "server.serving")


def test_importing_and_running_the_migrations_loads_no_repository(tmp_path: Path) -> None:
    # A fresh interpreter: this one has imported the repositories already. The upgrade runs env.py
    # and the revisions, which once imported the ledger and the job store for their tables.
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    code = (
        "import sys\n"
        "import server.db, server.db.engine, server.db.tables\n"
        "from server.db.migrations import upgrade_to_head\n"
        f"upgrade_to_head({url!r})\n"
        f"print(sorted(set({REPOSITORIES!r}) & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:////srv/sd3/ledger.sqlite3", Path("/srv/sd3/ledger.sqlite3")),
        ("sqlite:///relative/ledger.sqlite3", Path("relative/ledger.sqlite3")),
        ("sqlite:///~/ledger.sqlite3", Path("~/ledger.sqlite3").expanduser()),
        ("sqlite://", None),
        ("sqlite:///:memory:", None),
        ("sqlite:///file:ledger?mode=ro&uri=true", None),
        ("postgresql+psycopg://user:secret@db/sd3", None),
    ],
)
def test_sqlite_path_is_the_file_of_a_plain_sqlite_url_only(url: str, expected: Path | None) -> None:
    assert sqlite_path(url) == expected


def test_a_new_file_is_switched_to_wal_once_the_lock_holder_lets_go(tmp_path: Path) -> None:
    # SQLite refuses the switch at once while another connection holds a lock, busy timeout or not:
    # processes opening a new database together would fail without the engine's wait.
    path = tmp_path / "ledger.sqlite3"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x INTEGER)")
    holder.execute("BEGIN IMMEDIATE")
    engine = create_database_engine(f"sqlite:///{path}")
    modes: list[str] = []

    def connect() -> None:
        with engine.connect() as conn:
            modes.append(conn.exec_driver_sql("PRAGMA journal_mode").scalar_one())

    opener = threading.Thread(target=connect)
    opener.start()
    try:
        time.sleep(0.5)
        assert opener.is_alive() and not modes
    finally:
        holder.execute("COMMIT")
        holder.close()
    opener.join(timeout=30)
    engine.dispose()
    assert modes == ["wal"]
