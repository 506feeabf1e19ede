"""Credit amounts: the one place that parses, bounds, converts and formats them.

The ledger stores integer micro-credits (1 credit = 1 000 000) in signed 64-bit columns. Every
amount that reaches it, from the CLI, the admin API, a price or a job's cost, passes `to_micro`,
which checks sign, magnitude and precision on the decimal's digits and exponent *before* any
arithmetic: "1e999999999" is refused in microseconds instead of building a billion-digit number.

Bounds (docs/reliability.md, "Amounts, key names and instance identity"): one amount and one
grant's resulting balance are at most `MAX_CREDITS`, far below 2^63 micro-credits, so a sum of
balances, grants or charges can never overflow the columns.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

MICRO = 1_000_000
DECIMALS = 6
# A round number well below 2^63 micro-credits (9.2e12 credits): 10^15 micro-credits, so even a
# thousand keys at the maximum sum to under 2^63.
MAX_CREDITS = 10**9
MAX_MICRO = MAX_CREDITS * MICRO
# Plain decimal notation with an optional exponent, ASCII digits only: Python's Decimal would also
# take "1_000", "١٢" (Arabic-Indic digits), " 5 " and "NaN", which no one means as an amount.
_AMOUNT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# How much of a refused input an error message repeats.
_ECHO_MAX = 40


class InvalidAmount(ValueError):
    """A credit amount that is not a number, negative, too large or finer than a micro-credit."""


def _echo(text: str) -> str:
    return repr(text if len(text) <= _ECHO_MAX else text[:_ECHO_MAX] + "…")


def to_micro(amount: Decimal | int) -> int:
    """Exact conversion of an amount in [0, MAX_CREDITS]; more than 6 decimals is an error, not a rounding."""
    if isinstance(amount, bool) or not isinstance(amount, (Decimal, int)):
        # A float has already lost the exact value (0.1 is not 1/10), so refuse it rather than guess.
        raise TypeError(f"credit amounts are Decimal or int, got {type(amount).__name__}")
    if isinstance(amount, int):
        if amount < 0:
            raise InvalidAmount(f"a credit amount must not be negative, got {amount}")
        if amount > MAX_CREDITS:
            # No echo: str() of a huge int is itself slow (and refused past 4300 digits).
            raise InvalidAmount(f"a credit amount is at most {MAX_CREDITS} credits")
        return amount * MICRO
    if not amount.is_finite():
        raise InvalidAmount(f"a credit amount must be a finite number, got {amount}")
    sign, digits, exponent = amount.as_tuple()
    assert isinstance(exponent, int)  # finite, checked above
    # Only the digits and the exponent are looked at until the value is known to be small: both are
    # as long as the text the amount came from, whatever the exponent says.
    significant = len(digits)
    while significant > 0 and digits[significant - 1] == 0:
        significant -= 1
    if significant == 0:
        return 0  # zero, "-0" and "0E+999999999" alike
    if sign:
        raise InvalidAmount(f"a credit amount must not be negative, got {_echo(str(amount))}")
    exponent += len(digits) - significant  # trailing zeros move into the exponent: 1.500 → 15E-1
    if exponent + significant - 1 >= len(str(MAX_CREDITS)):  # the power of ten of the leading digit
        raise InvalidAmount(f"a credit amount is at most {MAX_CREDITS} credits, got {_echo(str(amount))}")
    if exponent < -DECIMALS:
        raise InvalidAmount(f"a credit amount has at most {DECIMALS} decimals, got {_echo(str(amount))}")
    # At most 16 digits are left (10 before the point, 6 after), so this is small integer arithmetic.
    # int(): typeshed types int ** int as Any (a negative power is a float); this one is never negative.
    micro = int("".join(map(str, digits[:significant]))) * int(10 ** (exponent + DECIMALS))
    if micro > MAX_MICRO:
        raise InvalidAmount(f"a credit amount is at most {MAX_CREDITS} credits, got {amount}")
    return micro


def from_micro(micro: int) -> Decimal:
    return Decimal(micro).scaleb(-DECIMALS)


def parse_credits(text: str) -> Decimal:
    """A credit amount typed by a person (CLI argument, admin API field), checked by `to_micro`'s rules.

    Raises `InvalidAmount` with a message that says what is wrong; the message repeats at most the
    first few characters of the input.
    """
    text = text.strip()
    if not _AMOUNT.fullmatch(text):
        raise InvalidAmount(f"not a decimal number: {_echo(text)}")
    try:
        value = Decimal(text)
    except InvalidOperation:  # an exponent beyond what Decimal represents at all
        raise InvalidAmount(f"not a usable number: {_echo(text)}") from None
    return from_micro(to_micro(value))


def format_credits(amount: Decimal) -> str:
    # A plain decimal string ("12.5", never "1.25E+1"), as `segmindapi` parses it with float().
    return format(amount.normalize(), "f")
