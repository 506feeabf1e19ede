"""The credit ledger: API keys, their balances, charges per request and a journal of grants.

Amounts are stored as integer micro-credits (1 credit = 1 000 000) so that every balance is exact,
and exposed as `Decimal`; server/credits.py converts and bounds them (a grant never takes a balance
past `MAX_CREDITS`). Each public operation is one transaction. Spending is one conditional
UPDATE (`balance >= price`), so the database itself refuses an overspend, whatever the number of
threads or processes: SQLite serialises writers (WAL + a busy timeout so they wait instead of
failing), PostgreSQL re-checks the WHERE clause on the row it locks.

Works on a SQLite file (the default) and on PostgreSQL; only portable SQL is used.

Every transaction that writes starts with its write. On SQLite the Python driver opens the
transaction at the first INSERT/UPDATE, so a read placed before it would run outside the transaction
and could act on a stale balance; writing first also takes the write lock at once.
"""

from __future__ import annotations

import hmac
import time
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    column,
    create_engine,
    event,
    func,
    insert,
    select,
    table,
    update,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DatabaseError, IntegrityError

from server.auth import generate_key, hash_key, key_prefix
from server.credits import MAX_CREDITS, MAX_MICRO, format_credits, from_micro, to_micro
from server.errors import BalanceLimitExceeded, InsufficientCredits, KeyNameTaken, Unauthorized, UnknownKey
from server.migrations import upgrade_to_head

NAME_MAX = 128
REQUEST_ID_MAX = 64
NOTE_MAX = 500
OWNER_MAX = 128
# How long a SQLite writer waits for another one before giving up ("database is locked").
SQLITE_BUSY_TIMEOUT_S = 30.0
# How long a reservation may stay open after its job finished (or, with no job row, after it was
# made) before the audit calls it stale: the refund that follows a failure is a separate write,
# retried while the database refuses it (docs/reliability.md, "Admission, cancellation and refunds").
STALE_RESERVATION_GRACE_S = 60.0

ChargeStatus = Literal["reserved", "settled", "refunded"]

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

# The job store's table, as far as the audit reads it. Declared here as a lightweight table rather
# than imported: the job store builds on the ledger (server/job_store.py), not the other way round.
_jobs = table("jobs", column("request_id"), column("status"), column("finished_at", DateTime(timezone=True)))

credit_grants = Table(
    "credit_grants",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key_id", Integer, ForeignKey("api_keys.id"), nullable=False, index=True),
    Column("amount_micro", BigInteger, nullable=False),
    Column("note", String(NOTE_MAX), nullable=False, default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class KeyRecord:
    id: int
    name: str
    prefix: str
    enabled: bool
    balance: Decimal
    created_at: datetime


@dataclass(frozen=True)
class AuditRow:
    name: str
    granted: Decimal
    charged: Decimal  # reserved or settled; refunded charges gave their amount back
    balance: Decimal
    open_reservations: int
    # Open reservations that nothing will settle or refund any more: their job finished (or was never
    # recorded) longer than STALE_RESERVATION_GRACE_S ago, yet the credits are still held.
    stale_reservations: int
    balanced: bool  # granted − charged == balance
    ok: bool  # balanced, and no stale reservation


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _utc(value: datetime) -> datetime:
    # SQLite keeps no time zone; every timestamp we write is UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def _record(row: Any) -> KeyRecord:
    return KeyRecord(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        enabled=bool(row.enabled),
        balance=from_micro(row.balance_micro),
        created_at=_utc(row.created_at),
    )


_KEY_COLUMNS = (
    api_keys.c.id,
    api_keys.c.name,
    api_keys.c.prefix,
    api_keys.c.enabled,
    api_keys.c.balance_micro,
    api_keys.c.created_at,
)


def _sqlite_engine(url: str) -> Engine:
    parsed = make_url(url)
    database = parsed.database
    if not database or database == ":memory:" or parsed.query.get("mode") == "memory":
        # Each pooled connection would see its own empty database, and nothing would outlive the process.
        raise ValueError(f"the ledger needs a SQLite file, not an in-memory database: {url}")
    if not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)

    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S}, hide_parameters=True)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            # WAL: readers never block the writer, and the writer never blocks readers. It is a property
            # of the file; setting it again on every connection is a no-op once it is on.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    return engine


class Ledger:
    # Every engine is built with `hide_parameters=True`: a database error's message otherwise
    # carries the statement's bound values (a key's hash, a request id) into the logs.
    def __init__(self, database_url: str) -> None:
        backend = make_url(database_url).get_backend_name()
        if backend == "sqlite":
            self._engine = _sqlite_engine(database_url)
        else:
            self._engine = create_engine(database_url, pool_pre_ping=True, hide_parameters=True)
        self._create_tables()

    def _create_tables(self) -> None:
        # The upgrade locks the database against other workers starting at once (server/migrations);
        # the retry stays as a second line of defence for a lock that timed out under heavy load.
        for attempt in range(3):
            try:
                upgrade_to_head(self._engine)
                return
            except DatabaseError:
                if attempt == 2:
                    raise
                time.sleep(0.1 * (attempt + 1))

    @property
    def engine(self) -> Engine:
        # Shared with the job store: one database, one connection pool.
        return self._engine

    def close(self) -> None:
        self._engine.dispose()

    def probe(self) -> None:
        """Run the reads every authenticated request makes; raise the database's error if they fail.

        A few page reads, not an integrity check: the key table and its hash index, the pages a
        corrupted file or a lost table break first (docs/reliability.md, "Connections and start-up").
        """
        with self._engine.connect() as conn:
            conn.execute(select(api_keys.c.id).order_by(api_keys.c.id).limit(1)).all()
            conn.execute(select(api_keys.c.id).where(api_keys.c.key_hash == "")).all()
            conn.execute(select(charges.c.request_id).limit(1)).all()

    # --- keys -------------------------------------------------------------------------------------

    def create_key(self, *, name: str, credits: Decimal) -> tuple[KeyRecord, str]:
        """Create a key with an opening balance; the plaintext key is returned here and never again."""
        name = name.strip()
        if not name or len(name) > NAME_MAX:
            raise ValueError(f"a key needs a name of 1 to {NAME_MAX} characters, got {name!r}")
        if any(unicodedata.category(char) == "Cc" for char in name):
            # A newline or escape sequence in a name would forge lines in text logs and tables.
            raise ValueError(f"a key name cannot contain control characters, got {name!r}")
        micro = to_micro(credits)
        key = generate_key()
        now = _now()
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    insert(api_keys).values(
                        name=name,
                        key_hash=hash_key(key),
                        prefix=key_prefix(key),
                        enabled=True,
                        balance_micro=micro,
                        created_at=now,
                    )
                )
                row = conn.execute(select(*_KEY_COLUMNS).where(api_keys.c.name == name)).one()
                conn.execute(
                    insert(credit_grants).values(
                        key_id=row.id, amount_micro=micro, note="opening balance", created_at=now
                    )
                )
        except IntegrityError as exc:
            # The hash is 256 bits of fresh randomness, so a unique violation can only be the name.
            raise KeyNameTaken(f"a key named {name!r} already exists") from exc
        return _record(row), key

    def list_keys(self) -> list[KeyRecord]:
        with self._engine.connect() as conn:
            rows = conn.execute(select(*_KEY_COLUMNS).order_by(api_keys.c.id)).all()
        return [_record(row) for row in rows]

    def add_credits(self, name: str, amount: Decimal, *, note: str = "") -> Decimal:
        """Grant credits (never negative: taking credits back is not a grant) and journal it.

        Raises `BalanceLimitExceeded`, granting nothing, when the balance would pass `MAX_CREDITS`.
        """
        micro = to_micro(amount)
        # Checked here because PostgreSQL would refuse a longer note while SQLite would store it.
        if len(note) > NOTE_MAX:
            raise ValueError(f"a note has at most {NOTE_MAX} characters")
        with self._engine.begin() as conn:
            # Write first (see the module docstring); the read after it sees our own locked row. The
            # maximum is part of the conditional UPDATE, so concurrent grants cannot pass it together.
            matched = conn.execute(
                update(api_keys)
                .where(api_keys.c.name == name, api_keys.c.balance_micro <= MAX_MICRO - micro)
                .values(balance_micro=api_keys.c.balance_micro + micro)
            ).rowcount
            if matched == 0:
                current = conn.execute(
                    select(api_keys.c.balance_micro).where(api_keys.c.name == name)
                ).scalar_one_or_none()
                if current is None:
                    raise UnknownKey(f"no key named {name!r}")
                would_be = format_credits(from_micro(current + micro))
                raise BalanceLimitExceeded(
                    f"the balance of {name!r} would be {would_be} credits, "
                    f"over the maximum of {MAX_CREDITS} a key may hold"
                )
            key_id, balance_micro = conn.execute(
                select(api_keys.c.id, api_keys.c.balance_micro).where(api_keys.c.name == name)
            ).one()
            conn.execute(
                insert(credit_grants).values(key_id=key_id, amount_micro=micro, note=note, created_at=_now())
            )
        return from_micro(balance_micro)

    def set_enabled(self, name: str, enabled: bool) -> None:
        with self._engine.begin() as conn:
            matched = conn.execute(
                update(api_keys).where(api_keys.c.name == name).values(enabled=enabled)
            ).rowcount
        if matched == 0:
            raise UnknownKey(f"no key named {name!r}")

    def find_by_hash(self, key_hash: str) -> KeyRecord | None:
        with self._engine.connect() as conn:
            row = conn.execute(
                select(*_KEY_COLUMNS, api_keys.c.key_hash).where(api_keys.c.key_hash == key_hash)
            ).one_or_none()
        # The index lookup found the row; confirm in constant time, so that no byte-by-byte comparison
        # of the secret-derived value is ever what decides.
        if row is None or not hmac.compare_digest(row.key_hash, key_hash):
            return None
        return _record(row)

    def balance(self, key_id: int) -> Decimal:
        with self._engine.connect() as conn:
            micro = conn.execute(
                select(api_keys.c.balance_micro).where(api_keys.c.id == key_id)
            ).scalar_one_or_none()
        if micro is None:
            raise UnknownKey(f"no key with id {key_id}")
        return from_micro(micro)

    # --- charges ----------------------------------------------------------------------------------

    def reserve(self, *, key_id: int, amount: Decimal, request_id: str, owner: str = "") -> Decimal:
        """Take `amount` from the key for `request_id`; returns the balance after.

        Raises InsufficientCredits (and writes nothing) when the balance is below the amount,
        Unauthorized when the key was disabled or deleted since it was authenticated.
        """
        micro = to_micro(amount)
        if not request_id or len(request_id) > REQUEST_ID_MAX:
            raise ValueError(f"a request id has 1 to {REQUEST_ID_MAX} characters, got {request_id!r}")
        now = _now()
        with self._engine.begin() as conn:
            # One conditional UPDATE: the check and the debit are one atomic step in the database,
            # so two requests can never both spend the same credits.
            matched = conn.execute(
                update(api_keys)
                .where(
                    api_keys.c.id == key_id,
                    api_keys.c.enabled.is_(True),
                    api_keys.c.balance_micro >= micro,
                )
                .values(balance_micro=api_keys.c.balance_micro - micro)
            ).rowcount
            if matched == 0:
                current = conn.execute(
                    select(api_keys.c.enabled, api_keys.c.balance_micro).where(api_keys.c.id == key_id)
                ).one_or_none()
                if current is None or not current.enabled:
                    raise Unauthorized()
                raise InsufficientCredits(balance=from_micro(current.balance_micro), price=from_micro(micro))
            self._insert_charge(conn, request_id=request_id, key_id=key_id, micro=micro, now=now, owner=owner)
            # We hold the row's write lock until commit, so this is the balance our debit left.
            balance_micro = conn.execute(
                select(api_keys.c.balance_micro).where(api_keys.c.id == key_id)
            ).scalar_one()
        return from_micro(balance_micro)

    @staticmethod
    def _insert_charge(
        conn: Connection, *, request_id: str, key_id: int, micro: int, now: datetime, owner: str
    ) -> None:
        try:
            # A savepoint would not help: the debit must roll back with a refused charge row anyway.
            conn.execute(
                insert(charges).values(
                    request_id=request_id,
                    key_id=key_id,
                    amount_micro=micro,
                    status="reserved",
                    owner=owner[:OWNER_MAX],
                    created_at=now,
                    updated_at=now,
                )
            )
        except IntegrityError as exc:
            raise ValueError(f"request id {request_id!r} has already been charged") from exc

    def settle(self, request_id: str) -> None:
        """reserved → settled. Settling twice is a no-op; settling a refunded charge is an error."""
        with self._engine.begin() as conn:
            matched = conn.execute(
                update(charges)
                .where(charges.c.request_id == request_id, charges.c.status == "reserved")
                .values(status="settled", updated_at=_now())
            ).rowcount
            if matched:
                return
            status = self._status(conn, request_id)
        if status is None:
            raise LookupError(f"no charge for request id {request_id!r}")
        if status != "settled":
            raise ValueError(f"the charge for request id {request_id!r} is {status}, it cannot be settled")

    def refund(self, request_id: str) -> Decimal:
        """reserved → refunded, and the amount goes back to the key; returns the balance after.

        Idempotent: only the transaction that flips the status gives the credits back, so a second
        refund (or a refund of a settled charge) changes nothing.
        """
        with self._engine.begin() as conn:
            matched = conn.execute(
                update(charges)
                .where(charges.c.request_id == request_id, charges.c.status == "reserved")
                .values(status="refunded", updated_at=_now())
            ).rowcount
            charge = conn.execute(
                select(charges.c.key_id, charges.c.amount_micro).where(charges.c.request_id == request_id)
            ).one_or_none()
            if charge is None:
                raise LookupError(f"no charge for request id {request_id!r}")
            if matched:
                conn.execute(
                    update(api_keys)
                    .where(api_keys.c.id == charge.key_id)
                    .values(balance_micro=api_keys.c.balance_micro + charge.amount_micro)
                )
            balance_micro = conn.execute(
                select(api_keys.c.balance_micro).where(api_keys.c.id == charge.key_id)
            ).scalar_one()
        return from_micro(balance_micro)

    def refund_abandoned(self, owner: str, *, keep: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Refund every reservation `owner` left open (a crash or kill -9 mid-generation).

        Called by a server instance at start-up, before it takes requests: nothing of its own can
        be in flight then, so whatever is still reserved under its name will never be settled.
        """
        with self._engine.connect() as conn:
            open_ids = list(
                conn.execute(
                    select(charges.c.request_id).where(
                        charges.c.owner == owner, charges.c.status == "reserved"
                    )
                ).scalars()
            )
        refunded = [request_id for request_id in open_ids if request_id not in keep]
        for request_id in refunded:
            self.refund(request_id)
        return refunded

    def audit(self, *, grace_s: float = STALE_RESERVATION_GRACE_S) -> list[AuditRow]:
        """Per key: granted − charged (reserved or settled) against the balance; stale reservations.

        The two sums always agree when the ledger is intact: a mismatch means a balance was changed
        outside the ledger's operations. A reservation is stale when its job is final (COMPLETED or
        FAILED) or absent, for longer than `grace_s`: then no running request will ever settle or
        refund it, and the key is short of credits it should have. Either makes the row not ok.
        """
        now = _now()
        with self._engine.connect() as conn:
            stale: dict[int, int] = {}
            for charge in conn.execute(
                select(charges.c.key_id, charges.c.created_at, _jobs.c.status, _jobs.c.finished_at)
                .select_from(charges.outerjoin(_jobs, _jobs.c.request_id == charges.c.request_id))
                .where(charges.c.status == "reserved")
            ).all():
                if charge.status is not None and charge.status not in ("COMPLETED", "FAILED"):
                    continue  # queued or running: its request will settle or refund it
                since = charge.finished_at if charge.status is not None else charge.created_at
                # A final job always has finished_at; a missing one counts from the reservation.
                since = _utc(since if since is not None else charge.created_at)
                if (now - since).total_seconds() > grace_s:
                    stale[charge.key_id] = stale.get(charge.key_id, 0) + 1
            granted: dict[int, int] = dict(
                conn.execute(
                    select(
                        credit_grants.c.key_id, func.coalesce(func.sum(credit_grants.c.amount_micro), 0)
                    ).group_by(credit_grants.c.key_id)
                ).all()
            )
            charged: dict[int, int] = dict(
                conn.execute(
                    select(charges.c.key_id, func.coalesce(func.sum(charges.c.amount_micro), 0))
                    .where(charges.c.status.in_(("reserved", "settled")))
                    .group_by(charges.c.key_id)
                ).all()
            )
            reserved: dict[int, int] = dict(
                conn.execute(
                    select(charges.c.key_id, func.count())
                    .where(charges.c.status == "reserved")
                    .group_by(charges.c.key_id)
                ).all()
            )
            keys = conn.execute(
                select(api_keys.c.id, api_keys.c.name, api_keys.c.balance_micro).order_by(api_keys.c.id)
            ).all()
        rows = []
        for key in keys:
            expected = int(granted.get(key.id, 0)) - int(charged.get(key.id, 0))
            balanced = expected == key.balance_micro
            rows.append(
                AuditRow(
                    name=key.name,
                    granted=from_micro(int(granted.get(key.id, 0))),
                    charged=from_micro(int(charged.get(key.id, 0))),
                    balance=from_micro(key.balance_micro),
                    open_reservations=int(reserved.get(key.id, 0)),
                    stale_reservations=stale.get(key.id, 0),
                    balanced=balanced,
                    ok=balanced and not stale.get(key.id, 0),
                )
            )
        return rows

    def charge(self, request_id: str) -> ChargeStatus | None:
        with self._engine.connect() as conn:
            return self._status(conn, request_id)

    @staticmethod
    def _status(conn: Connection, request_id: str) -> ChargeStatus | None:
        status = conn.execute(
            select(charges.c.status).where(charges.c.request_id == request_id)
        ).scalar_one_or_none()
        return cast("ChargeStatus | None", status)
