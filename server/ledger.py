"""The credit ledger: API keys, their balances, charges per request and a journal of grants.

Amounts are stored as integer micro-credits (1 credit = 1 000 000) so that every balance is exact,
and exposed as `Decimal`; server/credits.py converts and bounds them (a grant never takes a balance
past `MAX_CREDITS`). Each public operation is one transaction. Spending is one conditional
UPDATE (`balance >= price`), so the database itself refuses an overspend, whatever the number of
threads or processes: SQLite serialises writers (WAL + a busy timeout so they wait instead of
failing), PostgreSQL re-checks the WHERE clause on the row it locks.

The tables are server/db/tables.py's and the engine (SQLite WAL, PostgreSQL) server/db/engine.py's.
The schema must be current already: start-up upgrades it once (server/db/migrations), not this class.

Every transaction that writes starts with its write. On SQLite the Python driver opens the
transaction at the first INSERT/UPDATE, so a read placed before it would run outside the transaction
and could act on a stale balance; writing first also takes the write lock at once.
"""

from __future__ import annotations

import hmac
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, cast

from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from server.credits import MAX_CREDITS, MAX_MICRO, format_credits, from_micro, to_micro
from server.db.engine import create_database_engine
from server.db.migrations import require_current_schema
from server.db.tables import (
    NAME_MAX,
    NOTE_MAX,
    OWNER_MAX,
    REQUEST_ID_MAX,
    api_keys,
    as_utc,
    charges,
    credit_grants,
    jobs,
    utc_now,
)
from server.errors import (
    BalanceLimitExceeded,
    ChargeAlreadyFinal,
    ChargeNotFound,
    InsufficientCredits,
    KeyNameTaken,
    RequestAlreadyCharged,
    Unauthorized,
    UnknownKey,
)
from server.keys import generate_key, hash_key, key_prefix

# How long a reservation may stay open after its job finished (or, with no job row, after it was
# made) before the audit calls it stale: the refund that follows a failure is a separate write,
# retried while the database refuses it (docs/reliability.md, "Admission, cancellation and refunds").
STALE_RESERVATION_GRACE_S = 60.0

ChargeStatus = Literal["reserved", "settled", "refunded"]


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


def _record(row: Any) -> KeyRecord:
    return KeyRecord(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        enabled=bool(row.enabled),
        balance=from_micro(row.balance_micro),
        created_at=as_utc(row.created_at),
    )


_KEY_COLUMNS = (
    api_keys.c.id,
    api_keys.c.name,
    api_keys.c.prefix,
    api_keys.c.enabled,
    api_keys.c.balance_micro,
    api_keys.c.created_at,
)


class Ledger:
    def __init__(self, database_url: str) -> None:
        """Open the ledger; raises `SchemaNotCurrent` (server/db/migrations) on a database that
        start-up has not upgraded, rather than failing later on a missing table or column."""
        self._engine = create_database_engine(database_url)
        try:
            require_current_schema(self._engine)
        except BaseException:
            self._engine.dispose()
            raise

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
        now = utc_now()
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
                insert(credit_grants).values(
                    key_id=key_id, amount_micro=micro, note=note, created_at=utc_now()
                )
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
        now = utc_now()
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
            raise RequestAlreadyCharged(f"request id {request_id!r} has already been charged") from exc

    def settle(self, request_id: str) -> None:
        """reserved → settled. Settling twice is a no-op; settling a refunded charge is an error."""
        with self._engine.begin() as conn:
            matched = conn.execute(
                update(charges)
                .where(charges.c.request_id == request_id, charges.c.status == "reserved")
                .values(status="settled", updated_at=utc_now())
            ).rowcount
            if matched:
                return
            status = self._status(conn, request_id)
        if status is None:
            raise ChargeNotFound(f"no charge for request id {request_id!r}")
        if status != "settled":
            raise ChargeAlreadyFinal(
                f"the charge for request id {request_id!r} is {status}, it cannot be settled"
            )

    def refund(self, request_id: str) -> Decimal:
        """reserved → refunded, and the amount goes back to the key; returns the balance after.

        Idempotent: only the transaction that flips the status gives the credits back, so a second
        refund (or a refund of a settled charge) changes nothing.
        """
        with self._engine.begin() as conn:
            matched = conn.execute(
                update(charges)
                .where(charges.c.request_id == request_id, charges.c.status == "reserved")
                .values(status="refunded", updated_at=utc_now())
            ).rowcount
            charge = conn.execute(
                select(charges.c.key_id, charges.c.amount_micro).where(charges.c.request_id == request_id)
            ).one_or_none()
            if charge is None:
                raise ChargeNotFound(f"no charge for request id {request_id!r}")
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

    def abandoned(self, owner: str, *, keep: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """The reservations `owner` left open (a crash or kill -9 mid-generation), less `keep`.

        Read by a server instance at start-up, before it takes requests: nothing of its own can be in
        flight then, so whatever is still reserved under its name will never be settled.
        """
        with self._engine.connect() as conn:
            open_ids = conn.execute(
                select(charges.c.request_id).where(charges.c.owner == owner, charges.c.status == "reserved")
            ).scalars()
            return [request_id for request_id in open_ids if request_id not in keep]

    def audit(self, *, grace_s: float = STALE_RESERVATION_GRACE_S) -> list[AuditRow]:
        """Per key: granted − charged (reserved or settled) against the balance; stale reservations.

        The two sums always agree when the ledger is intact: a mismatch means a balance was changed
        outside the ledger's operations. A reservation is stale when its job is final (COMPLETED or
        FAILED) or absent, for longer than `grace_s`: then no running request will ever settle or
        refund it, and the key is short of credits it should have. Either makes the row not ok.
        """
        now = utc_now()
        with self._engine.connect() as conn:
            stale: dict[int, int] = {}
            for charge in conn.execute(
                select(charges.c.key_id, charges.c.created_at, jobs.c.status, jobs.c.finished_at)
                .select_from(charges.outerjoin(jobs, jobs.c.request_id == charges.c.request_id))
                .where(charges.c.status == "reserved")
            ).all():
                if charge.status is not None and charge.status not in ("COMPLETED", "FAILED"):
                    continue  # queued or running: its request will settle or refund it
                since = charge.finished_at if charge.status is not None else charge.created_at
                # A final job always has finished_at; a missing one counts from the reservation.
                since = as_utc(since if since is not None else charge.created_at)
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
