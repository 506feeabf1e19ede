"""The response-header contract (docs/contract.md §2), in one place.

Any response to an authenticated request carries `x-remaining-credits`, errors included: the
route stores the balance on `request.state` once the key is known, and both the success path and
the error handlers read it from there.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING

from server.credits import format_credits

if TYPE_CHECKING:  # only annotations: server/errors.py imports this module without the web stack
    from starlette.requests import Request

REMAINING_CREDITS = "x-remaining-credits"


__all__ = ["REMAINING_CREDITS", "credit_headers", "format_credits", "generation_headers", "remember_balance"]


def remember_balance(request: Request, balance: Decimal) -> None:
    request.state.remaining_credits = balance


def credit_headers(request: Request) -> dict[str, str]:
    balance = getattr(request.state, "remaining_credits", None)
    return {} if balance is None else {REMAINING_CREDITS: format_credits(balance)}


def generation_headers(
    request: Request, *, balance: Decimal, cost: Decimal, seconds: float, seed: int, request_id: str
) -> dict[str, str]:
    remember_balance(request, balance)
    return {
        **credit_headers(request),
        "x-cost": format_credits(cost),
        "x-generation-time": f"{seconds:.3f}",
        "x-seed-value": str(seed),  # the hosted service's name
        "x-seed": str(seed),
        "x-request-id": request_id,
    }
