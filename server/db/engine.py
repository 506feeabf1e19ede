"""The database engine, built in one place for the repositories and the migrations alike.

A SQLite file (the default) or PostgreSQL; only portable SQL is used above this module. SQLite runs
in WAL mode with a busy timeout: readers never block the writer, and a second writer waits its turn
instead of failing with "database is locked".

Every engine is built with `hide_parameters=True`: a database error's message otherwise carries the
statement's bound values (a key's hash, a request id) into the logs.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

# How long a SQLite writer (a request's transaction, or a migration) waits for another one.
SQLITE_BUSY_TIMEOUT_S = 30.0
# How often a connection retries switching a new file to WAL while another connection holds a lock.
WAL_SWITCH_RETRY_S = 0.05


def sqlite_path(database_url: str) -> Path | None:
    """The file a SQLite URL names; None for another backend, an in-memory database or a `file:` URI
    (whose options, not a plain path, decide what is opened)."""
    url = make_url(database_url)
    database = url.database
    if url.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:"):
        return None
    return Path(database).expanduser()


def create_database_engine(database_url: str, *, wal_and_foreign_keys: bool = True) -> Engine:
    """An engine for the server's database; a SQLite file's folder is created if it is missing.

    `wal_and_foreign_keys=False` is for the migrations, which keep SQLite's connections as they come:
    a schema status only reads, while switching a file to WAL writes it; and SQLite alters a table by
    copying it (Alembic's batch mode), which foreign-key enforcement gets in the way of.
    """
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, hide_parameters=True)
    if not url.database or url.database == ":memory:" or url.query.get("mode") == "memory":
        # Each pooled connection would see its own empty database, and nothing would outlive the process.
        raise ValueError(f"the ledger needs a SQLite file, not an in-memory database: {database_url}")
    path = sqlite_path(database_url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)

    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S}, hide_parameters=True)
    if wal_and_foreign_keys:
        event.listen(engine, "connect", _configure_connection)
    return engine


def _configure_connection(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        _switch_to_wal(cursor)
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _switch_to_wal(cursor: Any) -> None:
    """WAL: readers never block the writer, and the writer never blocks readers.

    It is a property of the file: once on, asking again is a no-op that takes no lock. The switch
    itself needs the file to itself, and SQLite refuses it at once ("database is locked") rather than
    waiting the busy timeout, so processes opening a new file together retry it here for that long.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(WAL_SWITCH_RETRY_S)
