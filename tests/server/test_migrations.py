"""The migrations build exactly the schema the table definitions describe, on SQLite and PostgreSQL.

Every test gets an empty database: a fresh SQLite file, or a fresh PostgreSQL schema (selected with
`search_path`, so the test needs no right to create databases) dropped afterwards.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import make_url

from server.db.migrations import (
    SchemaNotCurrent,
    alembic_config,
    head_revision,
    lock_for_migrations,
    schema_status,
    upgrade_to_head,
)
from server.db.tables import api_keys, charges, credit_grants, metadata
from server.job_store import JobStore
from server.ledger import Ledger
from tests.postgres import postgres_url_or_skip

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
        return
    base = postgres_url_or_skip()
    schema = f"test_migrations_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    # libpq's `options` reach every connection, the spawned processes' too, as part of the URL.
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def schema_differences(url: str) -> list[Any]:
    """What autogenerate would write in a new revision; empty when the database matches the code."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            )
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def version_rows(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())
    finally:
        engine.dispose()


def schema_snapshot(url: str) -> dict[str, Any]:
    engine = create_engine(url)
    try:
        inspector = inspect(engine)
        return {
            name: (
                [
                    (column["name"], str(column["type"]), column["nullable"])
                    for column in inspector.get_columns(name)
                ],
                sorted(index["name"] or "" for index in inspector.get_indexes(name)),
            )
            for name in sorted(inspector.get_table_names())
        }
    finally:
        engine.dispose()


# --- the revisions ----------------------------------------------------------------------------------


def test_there_is_one_head_so_no_two_revisions_branch_from_one_parent() -> None:
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    assert heads == [head_revision()]


def test_the_migrations_build_exactly_the_tables_the_code_defines(empty_database: str) -> None:
    status = upgrade_to_head(empty_database)
    assert status.up_to_date and status.current == head_revision()
    assert schema_differences(empty_database) == []
    assert version_rows(empty_database) == [head_revision()]


def test_upgrading_twice_changes_nothing(empty_database: str) -> None:
    upgrade_to_head(empty_database)
    before = schema_snapshot(empty_database)
    assert upgrade_to_head(empty_database).up_to_date
    assert schema_snapshot(empty_database) == before
    assert version_rows(empty_database) == [head_revision()]


def test_downgrading_to_nothing_and_upgrading_again_gives_the_same_schema(empty_database: str) -> None:
    from alembic import command

    upgrade_to_head(empty_database)
    before = schema_snapshot(empty_database)
    engine = create_engine(empty_database)
    with engine.begin() as conn:
        config = alembic_config()
        config.attributes["connection"] = conn
        command.downgrade(config, "base")
    engine.dispose()
    assert set(schema_snapshot(empty_database)) == {"alembic_version"}
    upgrade_to_head(empty_database)
    assert schema_snapshot(empty_database) == before


def test_a_ledger_on_a_database_start_up_has_not_upgraded_says_what_to_run(empty_database: str) -> None:
    # Start-up upgrades once (server/db/migrations); a repository only checks, and migrates nothing.
    assert schema_status(empty_database).current is None
    with pytest.raises(SchemaNotCurrent, match="revision none, .* run `sd3-server db upgrade`"):
        Ledger(empty_database)
    assert schema_status(empty_database).current is None
    upgrade_to_head(empty_database)
    ledger = Ledger(empty_database)
    JobStore(ledger.engine)
    ledger.close()
    assert schema_differences(empty_database) == []


def test_status_of_a_missing_sqlite_file_does_not_create_it(tmp_path: Path) -> None:
    path = tmp_path / "nothing-here.sqlite3"
    status = schema_status(f"sqlite:///{path}")
    assert status.current is None and not status.up_to_date
    assert not path.exists()


# --- databases made before migrations existed ---------------------------------------------------------


def put_a_key_with_history(url: str, *, charges_table: Table) -> None:
    """What the older code would have written: a key, its grant, one settled and one open charge."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            insert(api_keys).values(
                id=1,
                name="alice",
                key_hash="h" * 64,
                prefix="sd3_abcdef",
                enabled=True,
                balance_micro=922_000,
                created_at=NOW,
            )
        )
        conn.execute(
            insert(credit_grants).values(
                key_id=1, amount_micro=1_000_000, note="opening balance", created_at=NOW
            )
        )
        for request_id, status in (("settled-1", "settled"), ("open-1", "reserved")):
            values: dict[str, Any] = {"request_id": request_id, "key_id": 1, "amount_micro": 39_000}
            if "owner" in charges_table.c:
                values["owner"] = "old-instance"
            conn.execute(
                insert(charges_table).values(status=status, created_at=NOW, updated_at=NOW, **values)
            )
    engine.dispose()


def assert_the_key_and_its_history_survived(url: str, *, owner: str) -> None:
    ledger = Ledger(url)
    try:
        [row] = ledger.audit()
        assert (row.name, row.balance, row.open_reservations) == ("alice", Decimal("0.922"), 1)
        # The books balance, but the reservation of an instance that stopped months ago is stale.
        assert row.balanced and row.stale_reservations == 1 and not row.ok
        assert ledger.charge("settled-1") == "settled"
        # The open reservation is still owned by whoever made it, and can be refunded as usual.
        assert ledger.abandoned(owner) == ["open-1"]
        ledger.refund("open-1")
        assert ledger.balance(1) == Decimal("0.961")
        [row] = ledger.audit()
        assert row.ok
    finally:
        ledger.close()


def test_a_database_made_by_create_all_is_adopted_without_losing_data(empty_database: str) -> None:
    engine = create_engine(empty_database)
    # Exactly what Ledger and JobStore did before migrations: create_all of their table definitions.
    metadata.create_all(engine)
    engine.dispose()
    put_a_key_with_history(empty_database, charges_table=charges)

    assert schema_status(empty_database).current is None
    assert upgrade_to_head(empty_database).up_to_date
    assert schema_differences(empty_database) == []
    assert_the_key_and_its_history_survived(empty_database, owner="old-instance")


def legacy_metadata_before_owners() -> MetaData:
    """The tables as commit ccf5990 defined them: no charges.owner, and no jobs table yet."""
    metadata = MetaData()
    Table(
        "api_keys",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("name", String(128), nullable=False, unique=True),
        Column("key_hash", String(64), nullable=False, unique=True),
        Column("prefix", String(16), nullable=False),
        Column("enabled", Boolean, nullable=False, default=True),
        Column("balance_micro", BigInteger, nullable=False, default=0),
        Column("created_at", DateTime(timezone=True), nullable=False),
        CheckConstraint("balance_micro >= 0", name="ck_api_keys_balance_non_negative"),
    )
    Table(
        "charges",
        metadata,
        Column("request_id", String(64), primary_key=True),
        Column("key_id", Integer, ForeignKey("api_keys.id"), nullable=False, index=True),
        Column("amount_micro", BigInteger, nullable=False),
        Column("status", String(16), nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        CheckConstraint("status IN ('reserved', 'settled', 'refunded')", name="ck_charges_status"),
        CheckConstraint("amount_micro >= 0", name="ck_charges_amount_non_negative"),
    )
    Table(
        "credit_grants",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("key_id", Integer, ForeignKey("api_keys.id"), nullable=False, index=True),
        Column("amount_micro", BigInteger, nullable=False),
        Column("note", String(500), nullable=False, default=""),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )
    return metadata


def test_a_ledger_from_before_charge_owners_gains_the_column_and_the_jobs_table(empty_database: str) -> None:
    legacy = legacy_metadata_before_owners()
    engine = create_engine(empty_database)
    legacy.create_all(engine)
    engine.dispose()
    put_a_key_with_history(empty_database, charges_table=legacy.tables["charges"])

    assert upgrade_to_head(empty_database).up_to_date
    # The column, its index, the jobs table, and no default left behind: the schema of a new database.
    assert schema_differences(empty_database) == []
    engine = create_engine(empty_database)
    with engine.connect() as conn:
        assert dict(conn.execute(select(charges.c.request_id, charges.c.owner)).all()) == {
            "settled-1": "",
            "open-1": "",
        }
    engine.dispose()
    # Those reservations belonged to no instance; the owner '' is what reserve() writes without one.
    assert_the_key_and_its_history_survived(empty_database, owner="")


# --- servers starting together ------------------------------------------------------------------------


def start_a_server_process(url: str, barrier: Any, results: Any) -> None:
    barrier.wait()
    try:
        # What every process's start-up does before it builds a repository (server/db/migrations).
        upgrade_to_head(url)
        ledger = Ledger(url)
        JobStore(ledger.engine)
        ledger.close()
        results.put("ok")
    except Exception as exc:
        results.put(f"error: {exc!r}")


def test_servers_starting_together_on_a_new_database_upgrade_it_once(empty_database: str) -> None:
    # spawn: every process starts clean, as separate server workers would.
    context = multiprocessing.get_context("spawn")
    count = 6
    barrier, results = context.Barrier(count), context.Queue()
    processes = [
        context.Process(target=start_a_server_process, args=(empty_database, barrier, results))
        for _ in range(count)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert outcomes == ["ok"] * count
    assert version_rows(empty_database) == [head_revision()]
    assert schema_differences(empty_database) == []


def test_an_upgrade_waits_for_the_one_holding_the_migration_lock(empty_database: str) -> None:
    # The start-up test above passes even without a lock (the upgrade retries); this one pins the lock.
    holder = create_engine(empty_database)
    conn = holder.connect()
    transaction = conn.begin()
    lock_for_migrations(conn)
    upgrader = threading.Thread(target=upgrade_to_head, args=(empty_database,))
    upgrader.start()
    try:
        time.sleep(0.5)
        assert upgrader.is_alive()
        assert schema_status(empty_database).current is None
    finally:
        transaction.commit()
        conn.close()
        holder.dispose()
    upgrader.join(timeout=30)
    assert not upgrader.is_alive()
    assert schema_status(empty_database).up_to_date


def test_a_database_migrated_by_a_newer_release_is_refused_with_a_reason(empty_database: str) -> None:
    upgrade_to_head(empty_database)
    engine = create_engine(empty_database)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(RuntimeError, match="revision 9999, which this sd3-server"):
        upgrade_to_head(empty_database)
