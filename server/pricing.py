"""The price of a generation request, in credits (api-contract.md §4).

price = price_per_image × samples × (steps / reference_steps) × (width × height / reference_pixels),
rounded half-up to 6 decimals — the resolution of the ledger (1 credit = 1 000 000 micro-credits).
"""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

from server.config import PricingSettings

PRICE_DECIMALS = 6


def price_of(*, width: int, height: int, steps: int, samples: int, pricing: PricingSettings) -> Decimal:
    for field, value in (("width", width), ("height", height), ("steps", steps), ("samples", samples)):
        if value < 1:
            raise ValueError(f"{field} must be at least 1, got {value}")
    if pricing.reference_steps < 1 or pricing.reference_pixels < 1:
        raise ValueError("pricing.reference_steps and pricing.reference_pixels must be at least 1")
    if not pricing.price_per_image.is_finite() or pricing.price_per_image < 0:
        raise ValueError(f"pricing.price_per_image must be non-negative, got {pricing.price_per_image}")

    # A Fraction keeps every step exact: Decimal division would round at the context precision first
    # and could then round a second time, which is how one micro-credit goes astray.
    exact = (
        Fraction(pricing.price_per_image)
        * samples
        * steps
        * width
        * height
        / (pricing.reference_steps * pricing.reference_pixels)
    )
    scaled = exact * 10**PRICE_DECIMALS
    # The value is non-negative, so floor(x + 1/2) is exactly ROUND_HALF_UP.
    units = int(scaled + Fraction(1, 2))
    return Decimal(units).scaleb(-PRICE_DECIMALS)
