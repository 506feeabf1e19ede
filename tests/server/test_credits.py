"""Credit amounts: one parser and converter, bounded before any arithmetic; a balance has a maximum."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from server.credits import MAX_CREDITS, MAX_MICRO, InvalidAmount, parse_credits, to_micro
from server.errors import BalanceLimitExceeded
from server.ledger import Ledger
from tests.databases import migrated
from tests.postgres import postgres_url_or_skip

# Each of these took minutes of CPU under the GIL when the amount became a Fraction first; a refusal
# now takes microseconds, so this bound only says "not frozen".
NOT_FROZEN_S = 5.0


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger(migrated(f"sqlite:///{tmp_path / 'ledger.sqlite3'}"))
    yield ledger
    ledger.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def any_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}" if request.param == "sqlite" else postgres_url_or_skip()
    ledger = Ledger(migrated(url))
    yield ledger
    ledger.close()


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("1e999999999", "at most"),
        ("1e-999999999", "decimals"),
        ("-1e999999999", "negative"),
        ("9" * 100_000, "at most"),
        ("0." + "0" * 100_000 + "1", "decimals"),
        ("1e99999999999999999999", "number"),
    ],
)
def test_huge_or_tiny_exponents_are_refused_at_once(text: str, reason: str) -> None:
    started = time.perf_counter()
    with pytest.raises(InvalidAmount, match=reason) as refused:
        parse_credits(text)
    assert time.perf_counter() - started < NOT_FROZEN_S
    assert len(str(refused.value)) < 200  # the message does not echo a 100,000-digit input


@pytest.mark.parametrize(
    ("text", "micro"),
    [
        ("0", 0),
        ("-0", 0),
        ("12.5", 12_500_000),
        ("1e3", 1_000_000_000),
        ("0.000001", 1),
        ("1.50000000000", 1_500_000),  # trailing zeros beyond 6 decimals are still exact
        (" 2 ", 2_000_000),
        (str(MAX_CREDITS), MAX_MICRO),
        ("0E+999999999", 0),
    ],
)
def test_plain_amounts_parse_exactly(text: str, micro: int) -> None:
    assert to_micro(parse_credits(text)) == micro


@pytest.mark.parametrize("text", ["lots", "NaN", "Infinity", "1_000", "١٢", "0x10", "", "1e", "--1"])
def test_what_is_not_a_plain_decimal_number_is_refused(text: str) -> None:
    with pytest.raises(InvalidAmount, match="number"):
        parse_credits(text)


def test_amounts_past_the_maximum_balance_are_refused() -> None:
    with pytest.raises(InvalidAmount, match="at most"):
        parse_credits(f"{MAX_CREDITS}.000001")
    with pytest.raises(InvalidAmount, match="at most"):
        to_micro(MAX_CREDITS + 1)
    assert MAX_MICRO < 2**63 // 1000  # a thousand keys at the maximum still fit a 64-bit sum


def test_the_ledger_refuses_a_huge_exponent_without_freezing(ledger: Ledger) -> None:
    started = time.perf_counter()
    with pytest.raises(ValueError):
        ledger.create_key(name="alice", credits=Decimal("1e999999999"))
    ledger.create_key(name="bob", credits=Decimal(1))
    with pytest.raises(ValueError):
        ledger.add_credits("bob", Decimal("1e-999999999"))
    assert time.perf_counter() - started < NOT_FROZEN_S
    assert [(key.name, key.balance) for key in ledger.list_keys()] == [("bob", Decimal(1))]


def test_a_grant_past_the_maximum_balance_is_refused_and_the_audit_stays_ok(ledger: Ledger) -> None:
    # The report: two grants of 9e12 credits overflowed 2^63 micro-credits, SQLite stored a REAL
    # and the audit crashed.
    ledger.create_key(name="alice", credits=Decimal(MAX_CREDITS - 1))
    with pytest.raises(BalanceLimitExceeded, match="maximum"):
        ledger.add_credits("alice", Decimal(2))
    assert ledger.add_credits("alice", Decimal(1)) == Decimal(MAX_CREDITS)
    with pytest.raises(BalanceLimitExceeded):
        ledger.add_credits("alice", Decimal("0.000001"))
    with pytest.raises(ValueError):
        ledger.add_credits("alice", Decimal("9e12"))
    (row,) = ledger.audit()
    assert (row.ok, row.balance, row.granted) == (True, Decimal(MAX_CREDITS), Decimal(MAX_CREDITS))


def test_concurrent_grants_cannot_pass_the_maximum_together(any_ledger: Ledger) -> None:
    name = f"key-{uuid.uuid4().hex[:12]}"
    any_ledger.create_key(name=name, credits=Decimal(0))
    grant = Decimal(MAX_CREDITS) * Decimal("0.4")
    attempts = 8
    barrier = threading.Barrier(attempts)
    outcomes: list[str] = []
    lock = threading.Lock()

    def attempt() -> None:
        barrier.wait()
        try:
            any_ledger.add_credits(name, grant)
            outcome = "granted"
        except BalanceLimitExceeded:
            outcome = "refused"
        except BaseException as exc:  # a "database is locked" must fail the test, not hide
            outcome = repr(exc)
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=attempt) for _ in range(attempts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["granted"] * 2 + ["refused"] * 6
    (row,) = [row for row in any_ledger.audit() if row.name == name]
    assert row.ok and row.balance == grant * 2
