"""One racing reserve, reported through a queue: shared by the SQLite and PostgreSQL race tests,
whose contenders run in threads and in spawned processes (hence a module-level function)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from server.errors import InsufficientCredits
from server.ledger import Ledger


def reserve_and_report(
    ledger: Ledger, *, key_id: int, amount: Decimal, request_id: str, results: Any
) -> None:
    """Put "ok", "refused" (not enough credits) or the error on `results`; an error fails the test."""
    try:
        ledger.reserve(key_id=key_id, amount=amount, request_id=request_id)
        results.put("ok")
    except InsufficientCredits:
        results.put("refused")
    except Exception as exc:
        results.put(f"error: {exc!r}")
