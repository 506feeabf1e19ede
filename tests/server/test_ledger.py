import multiprocessing
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select

from server.db.tables import credit_grants
from server.errors import (
    ChargeAlreadyFinal,
    ChargeNotFound,
    InsufficientCredits,
    KeyNameTaken,
    RequestAlreadyCharged,
    Unauthorized,
    UnknownKey,
)
from server.keys import hash_key
from server.ledger import Ledger
from tests.databases import migrated
from tests.ledger_race import reserve_and_report
from tests.postgres import postgres_url_or_skip

PRICE = Decimal("0.039")


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.sqlite3'}"


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger(migrated(sqlite_url(tmp_path)))
    yield ledger
    ledger.close()


def postgres_url() -> str:
    return postgres_url_or_skip()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def any_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    url = sqlite_url(tmp_path) if request.param == "sqlite" else postgres_url()
    ledger = Ledger(migrated(url))
    yield ledger
    ledger.close()


def unique_name() -> str:
    # PostgreSQL databases outlive the test run, so names must not repeat.
    return f"key-{uuid.uuid4().hex[:12]}"


# --- keys ------------------------------------------------------------------------------------------


def test_create_key_returns_the_plaintext_once_and_the_record(ledger: Ledger) -> None:
    record, key = ledger.create_key(name="alice", credits=Decimal("10.5"))
    assert key.startswith("sd3_")
    assert record.name == "alice"
    assert record.prefix == key[:10]
    assert record.enabled is True
    assert record.balance == Decimal("10.5")
    assert record.created_at.tzinfo is not None
    assert abs(record.created_at - datetime.now(timezone.utc)).total_seconds() < 60
    assert ledger.list_keys() == [record]


def test_keys_are_stored_only_as_a_hash(tmp_path: Path) -> None:
    ledger = Ledger(migrated(sqlite_url(tmp_path)))
    _, key = ledger.create_key(name="alice", credits=Decimal(1))
    ledger.close()
    stored = b"".join(path.read_bytes() for path in tmp_path.iterdir() if path.is_file())
    assert key.encode() not in stored
    # The secret part after the displayed prefix must not appear in any form either.
    assert key[10:].encode() not in stored
    # The search is meaningful: what the ledger does store is found.
    assert hash_key(key).encode() in stored


def test_find_by_hash_returns_the_record_or_none(ledger: Ledger) -> None:
    record, key = ledger.create_key(name="alice", credits=Decimal(1))
    assert ledger.find_by_hash(hash_key(key)) == record
    assert ledger.find_by_hash(hash_key(key + "x")) is None


def test_key_names_are_unique(ledger: Ledger) -> None:
    ledger.create_key(name="alice", credits=Decimal(1))
    with pytest.raises(KeyNameTaken):
        ledger.create_key(name="alice", credits=Decimal(2))
    assert [record.name for record in ledger.list_keys()] == ["alice"]


def test_keys_are_listed_in_creation_order(ledger: Ledger) -> None:
    for name in ("carol", "alice", "bob"):
        ledger.create_key(name=name, credits=Decimal(0))
    assert [record.name for record in ledger.list_keys()] == ["carol", "alice", "bob"]


def test_add_credits_returns_the_exact_new_balance_and_journals_the_grant(
    tmp_path: Path, ledger: Ledger
) -> None:
    record, _ = ledger.create_key(name="alice", credits=Decimal("0.1"))
    assert ledger.add_credits("alice", Decimal("0.2"), note="top-up") == Decimal("0.3")
    assert ledger.balance(record.id) == Decimal("0.3")
    engine = create_engine(sqlite_url(tmp_path))
    with engine.connect() as conn:
        rows = conn.execute(select(credit_grants.c.amount_micro, credit_grants.c.note)).all()
    engine.dispose()
    assert [tuple(row) for row in rows] == [(100_000, "opening balance"), (200_000, "top-up")]


def test_add_credits_refuses_negative_amounts_and_unknown_keys(ledger: Ledger) -> None:
    ledger.create_key(name="alice", credits=Decimal(1))
    with pytest.raises(ValueError, match="negative"):
        ledger.add_credits("alice", Decimal("-0.5"))
    with pytest.raises(UnknownKey):
        ledger.add_credits("bob", Decimal(1))
    assert ledger.list_keys()[0].balance == Decimal(1)


@pytest.mark.parametrize("amount", [Decimal("0.0000001"), Decimal("1.1234567"), Decimal("NaN")])
def test_amounts_finer_than_a_micro_credit_are_refused(ledger: Ledger, amount: Decimal) -> None:
    record, _ = ledger.create_key(name="alice", credits=Decimal(1))
    with pytest.raises(ValueError):
        ledger.add_credits("alice", amount)
    with pytest.raises(ValueError):
        ledger.reserve(key_id=record.id, amount=amount, request_id="r1")
    assert ledger.balance(record.id) == Decimal(1)
    assert ledger.charge("r1") is None


def test_trailing_zeros_beyond_six_decimals_are_still_exact(ledger: Ledger) -> None:
    ledger.create_key(name="alice", credits=Decimal("1.0000000000"))
    assert ledger.add_credits("alice", Decimal("0.5000000")) == Decimal("1.5")


def test_floats_are_refused_because_they_are_not_exact(ledger: Ledger) -> None:
    with pytest.raises(TypeError):
        ledger.create_key(name="alice", credits=0.1)  # type: ignore[arg-type]


def test_set_enabled_toggles_the_key_and_refuses_unknown_names(ledger: Ledger) -> None:
    ledger.create_key(name="alice", credits=Decimal(1))
    ledger.set_enabled("alice", False)
    assert ledger.list_keys()[0].enabled is False
    ledger.set_enabled("alice", True)
    assert ledger.list_keys()[0].enabled is True
    with pytest.raises(UnknownKey):
        ledger.set_enabled("bob", False)


def test_the_folder_of_the_sqlite_file_is_created(tmp_path: Path) -> None:
    ledger = Ledger(migrated(f"sqlite:///{tmp_path / 'a' / 'b' / 'ledger.sqlite3'}"))
    ledger.create_key(name="alice", credits=Decimal(1))
    ledger.close()
    assert (tmp_path / "a" / "b" / "ledger.sqlite3").is_file()


def test_balances_survive_a_restart(tmp_path: Path) -> None:
    ledger = Ledger(migrated(sqlite_url(tmp_path)))
    record, _ = ledger.create_key(name="alice", credits=Decimal(1))
    ledger.reserve(key_id=record.id, amount=PRICE, request_id="r1")
    ledger.close()
    reopened = Ledger(sqlite_url(tmp_path))
    assert reopened.balance(record.id) == Decimal("0.961")
    assert reopened.charge("r1") == "reserved"
    reopened.close()


def test_an_in_memory_sqlite_database_is_refused() -> None:
    with pytest.raises(ValueError, match="SQLite file"):
        Ledger("sqlite://")


# --- reserve / settle / refund -----------------------------------------------------------------------


def test_reserve_debits_and_returns_the_balance_after(ledger: Ledger) -> None:
    record, _ = ledger.create_key(name="alice", credits=Decimal("0.1"))
    assert ledger.reserve(key_id=record.id, amount=PRICE, request_id="r1") == Decimal("0.061")
    assert ledger.balance(record.id) == Decimal("0.061")
    assert ledger.charge("r1") == "reserved"


def test_reserving_the_whole_balance_leaves_exactly_zero(ledger: Ledger) -> None:
    record, _ = ledger.create_key(name="alice", credits=Decimal("0.3"))
    for index in range(3):
        ledger.reserve(key_id=record.id, amount=Decimal("0.1"), request_id=f"r{index}")
    assert ledger.balance(record.id) == Decimal(0)


def test_insufficient_credits_raise_and_write_nothing(ledger: Ledger) -> None:
    record, _ = ledger.create_key(name="alice", credits=Decimal("0.038999"))
    with pytest.raises(InsufficientCredits) as raised:
        ledger.reserve(key_id=record.id, amount=PRICE, request_id="r1")
    assert raised.value.balance == Decimal("0.038999")
    assert raised.value.price == PRICE
    assert raised.value.status_code == 406
    assert ledger.balance(record.id) == Decimal("0.038999")
    assert ledger.charge("r1") is None


def test_a_disabled_key_cannot_reserve(ledger: Ledger) -> None:
    record, _ = ledger.create_key(name="alice", credits=Decimal(1))
    ledger.set_enabled("alice", False)
    with pytest.raises(Unauthorized):
        ledger.reserve(key_id=record.id, amount=PRICE, request_id="r1")
    assert ledger.balance(record.id) == Decimal(1)
    assert ledger.charge("r1") is None


def test_a_request_id_is_charged_once(ledger: Ledger) -> None:
    record, _ = ledger.create_key(name="alice", credits=Decimal(1))
    ledger.reserve(key_id=record.id, amount=PRICE, request_id="r1")
    with pytest.raises(ValueError, match="already been charged"):
        ledger.reserve(key_id=record.id, amount=PRICE, request_id="r1")
    # The second debit rolled back with its refused charge row.
    assert ledger.balance(record.id) == Decimal("0.961")


def test_settle_marks_the_charge_settled_and_keeps_the_credits(ledger: Ledger) -> None:
    record, _ = ledger.create_key(name="alice", credits=Decimal(1))
    ledger.reserve(key_id=record.id, amount=PRICE, request_id="r1")
    ledger.settle("r1")
    assert ledger.charge("r1") == "settled"
    ledger.settle("r1")
    assert ledger.charge("r1") == "settled"
    assert ledger.balance(record.id) == Decimal("0.961")


def test_settle_refuses_unknown_and_refunded_charges(ledger: Ledger) -> None:
    record, _ = ledger.create_key(name="alice", credits=Decimal(1))
    with pytest.raises(LookupError):
        ledger.settle("nope")
    ledger.reserve(key_id=record.id, amount=PRICE, request_id="r1")
    ledger.refund("r1")
    with pytest.raises(ValueError, match="refunded"):
        ledger.settle("r1")
    assert ledger.balance(record.id) == Decimal(1)


def test_refund_gives_the_credits_back_once(ledger: Ledger) -> None:
    record, _ = ledger.create_key(name="alice", credits=Decimal(1))
    ledger.reserve(key_id=record.id, amount=PRICE, request_id="r1")
    assert ledger.refund("r1") == Decimal(1)
    assert ledger.charge("r1") == "refunded"
    assert ledger.refund("r1") == Decimal(1)
    assert ledger.balance(record.id) == Decimal(1)


def test_a_settled_charge_is_not_refunded(ledger: Ledger) -> None:
    record, _ = ledger.create_key(name="alice", credits=Decimal(1))
    ledger.reserve(key_id=record.id, amount=PRICE, request_id="r1")
    ledger.settle("r1")
    assert ledger.refund("r1") == Decimal("0.961")
    assert ledger.charge("r1") == "settled"


def test_refunding_an_unknown_charge_is_an_error(ledger: Ledger) -> None:
    with pytest.raises(LookupError):
        ledger.refund("nope")


def test_refused_charge_transitions_raise_the_ledgers_domain_errors(ledger: Ledger) -> None:
    record, _ = ledger.create_key(name="alice", credits=Decimal(1))
    with pytest.raises(ChargeNotFound):
        ledger.settle("nope")
    with pytest.raises(ChargeNotFound):
        ledger.refund("nope")
    ledger.reserve(key_id=record.id, amount=PRICE, request_id="r1")
    with pytest.raises(RequestAlreadyCharged):
        ledger.reserve(key_id=record.id, amount=PRICE, request_id="r1")
    ledger.refund("r1")
    with pytest.raises(ChargeAlreadyFinal):
        ledger.settle("r1")


def test_refund_only_touches_its_own_key(ledger: Ledger) -> None:
    alice, _ = ledger.create_key(name="alice", credits=Decimal(1))
    bob, _ = ledger.create_key(name="bob", credits=Decimal(1))
    ledger.reserve(key_id=alice.id, amount=PRICE, request_id="a1")
    ledger.reserve(key_id=bob.id, amount=PRICE, request_id="b1")
    ledger.refund("a1")
    assert ledger.balance(alice.id) == Decimal(1)
    assert ledger.balance(bob.id) == Decimal("0.961")


# --- concurrency -----------------------------------------------------------------------------------


def race_reserves(ledger: Ledger, key_id: int, attempts: int, tag: str) -> list[Decimal | None]:
    """Run `attempts` reserves at once from threads; None for a refused one, else the balance after."""
    barrier = threading.Barrier(attempts)
    results: list[Decimal | None] = [None] * attempts
    errors: list[BaseException] = []

    def attempt(index: int) -> None:
        barrier.wait()
        try:
            results[index] = ledger.reserve(key_id=key_id, amount=PRICE, request_id=f"{tag}-{index}")
        except InsufficientCredits:
            pass
        except BaseException as exc:  # surfaced below: a "database is locked" must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=attempt, args=(index,)) for index in range(attempts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    return results


def test_concurrent_reserves_from_threads_never_overspend(any_ledger: Ledger) -> None:
    record, _ = any_ledger.create_key(name=unique_name(), credits=PRICE * 5)
    results = race_reserves(any_ledger, record.id, attempts=16, tag=uuid.uuid4().hex)
    succeeded = [balance for balance in results if balance is not None]
    assert len(succeeded) == 5
    # Each success saw a distinct balance: 4, 3, 2, 1 and 0 prices left.
    assert sorted(succeeded) == [PRICE * left for left in range(5)]
    assert any_ledger.balance(record.id) == Decimal(0)


def test_concurrent_refunds_of_one_charge_give_the_credits_back_once(ledger: Ledger) -> None:
    record, _ = ledger.create_key(name="alice", credits=Decimal(1))
    ledger.reserve(key_id=record.id, amount=PRICE, request_id="r1")
    barrier = threading.Barrier(8)

    def refund() -> None:
        barrier.wait()
        ledger.refund("r1")

    threads = [threading.Thread(target=refund) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert ledger.balance(record.id) == Decimal(1)


def reserve_in_process(url: str, key_id: int, attempts: int, tag: str, barrier: Any, results: Any) -> None:
    # Its own Ledger, engine and connections: the only thing shared with the other processes is the file.
    ledger = Ledger(url)
    barrier.wait()
    for index in range(attempts):
        reserve_and_report(ledger, key_id=key_id, amount=PRICE, request_id=f"{tag}-{index}", results=results)
    ledger.close()


def test_concurrent_reserves_from_processes_never_overspend(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    ledger = Ledger(migrated(url))
    record, _ = ledger.create_key(name="alice", credits=PRICE * 5)
    # spawn: every process starts clean, as separate server workers would.
    context = multiprocessing.get_context("spawn")
    processes_count, attempts = 4, 4
    barrier = context.Barrier(processes_count)
    results = context.Queue()
    processes = [
        context.Process(
            target=reserve_in_process, args=(url, record.id, attempts, f"p{index}", barrier, results)
        )
        for index in range(processes_count)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=30) for _ in range(processes_count * attempts)]
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    assert sorted(outcomes) == ["ok"] * 5 + ["refused"] * 11
    assert ledger.balance(record.id) == Decimal(0)
    ledger.close()


def test_names_notes_and_request_ids_longer_than_their_columns_are_refused(ledger: Ledger) -> None:
    # SQLite would store them; PostgreSQL would fail mid-transaction. Both must see the same rule.
    with pytest.raises(ValueError, match="name"):
        ledger.create_key(name="x" * 129, credits=Decimal(1))
    with pytest.raises(ValueError, match="name"):
        ledger.create_key(name="   ", credits=Decimal(1))
    record, _ = ledger.create_key(name="alice", credits=Decimal(1))
    with pytest.raises(ValueError, match="note"):
        ledger.add_credits("alice", Decimal(1), note="x" * 501)
    with pytest.raises(ValueError, match="request id"):
        ledger.reserve(key_id=record.id, amount=PRICE, request_id="r" * 65)
    assert ledger.balance(record.id) == Decimal(1)
