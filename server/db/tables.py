"""Every table of the server's database, in the one `MetaData` the migrations compare against.

The repositories (server/ledger.py, server/job_store.py) read and write these tables; the Alembic
revisions under server/db/migrations/versions are frozen copies that reach the same schema step by
step, and tests/server/test_migrations.py checks that the two agree.

Every timestamp column holds UTC. SQLite keeps no time zone and hands them back naive, hence
`as_utc` on the way out.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import overload

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

NAME_MAX = 128
REQUEST_ID_MAX = 64
NOTE_MAX = 500
OWNER_MAX = 128

metadata = MetaData()

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(NAME_MAX), nullable=False, unique=True),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),
    Column("enabled", Boolean, nullable=False, default=True),
    Column("balance_micro", BigInteger, nullable=False, default=0),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # A second line of defence: the conditional UPDATE is what prevents overspending.
    CheckConstraint("balance_micro >= 0", name="ck_api_keys_balance_non_negative"),
)

charges = Table(
    "charges",
    metadata,
    Column("request_id", String(REQUEST_ID_MAX), primary_key=True),
    Column("key_id", Integer, ForeignKey("api_keys.id"), nullable=False, index=True),
    Column("amount_micro", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    # Which server instance reserved it: after a crash, that instance refunds what it left open
    # without touching reservations that other replicas sharing the database are working on.
    Column("owner", String(OWNER_MAX), nullable=False, default="", index=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # A string with a CHECK rather than an ENUM type: portable, and no type to migrate on PostgreSQL.
    CheckConstraint("status IN ('reserved', 'settled', 'refunded')", name="ck_charges_status"),
    CheckConstraint("amount_micro >= 0", name="ck_charges_amount_non_negative"),
)

credit_grants = Table(
    "credit_grants",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key_id", Integer, ForeignKey("api_keys.id"), nullable=False, index=True),
    Column("amount_micro", BigInteger, nullable=False),
    Column("note", String(NOTE_MAX), nullable=False, default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# One row per generation request, whatever surface it came through (server/job_store.py).
jobs = Table(
    "jobs",
    metadata,
    Column("request_id", String(REQUEST_ID_MAX), primary_key=True),
    Column("key_id", Integer, nullable=False, index=True),
    Column("surface", String(8), nullable=False),
    Column("model", String(128), nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("params", Text, nullable=False),  # the validated request body, as JSON
    Column("seed", BigInteger, nullable=True),
    Column("cost_micro", BigInteger, nullable=False),
    Column("outputs", Text, nullable=False, default="[]"),  # JSON list of output ids
    Column("error", Text, nullable=True),
    Column("owner", String(OWNER_MAX), nullable=False, index=True),
    Column("progress_step", Integer, nullable=False, default=0),
    Column("progress_total", Integer, nullable=False, default=0),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Column("inference_s", Float, nullable=True),
)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@overload
def as_utc(value: datetime) -> datetime: ...
@overload
def as_utc(value: None) -> None: ...
def as_utc(value: datetime | None) -> datetime | None:
    """A timestamp read back from the database, with its (UTC) time zone restored where SQLite lost it."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)
