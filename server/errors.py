"""The error taxonomy of sd3-server: types only, no HTTP.

Everything below `server/api/` raises one of these domain errors, each with the status code the
contract gives it; the renderers of `server/api/renderers.py` turn them into a wire format
(Segmind's `{"error": "..."}` or OpenAI's error object), one renderer per router. Every expected
failure has its class. Unexpected failures during generation are wrapped in `GenerationFailed` by
the serving layer, which is where the refund happens; a failure of the database itself, wherever
it surfaces, is rendered as `DatabaseUnavailable` (503), and a bug as `InternalError` (500).
"""

from __future__ import annotations

import time
from decimal import Decimal

from server.headers import REMAINING_CREDITS, format_credits
from server.rate_limit import reset_at_utc


class ApiError(Exception):
    status_code: int = 500
    default_message: str = "Internal server error"

    def __init__(self, message: str | None = None, *, headers: dict[str, str] | None = None) -> None:
        self.message = message or self.default_message
        self.headers = dict(headers or {})
        super().__init__(self.message)


class Unauthorized(ApiError):
    status_code = 401
    default_message = "Unauthorized. API key is invalid or may have expired"


class MissingApiKey(Unauthorized):
    default_message = "Missing Authorization or x-api-key in header"


class NotFound(ApiError):
    status_code = 404
    default_message = "Not Found. The requested URL does not exist"


class MethodNotAllowed(ApiError):
    status_code = 405
    default_message = "Method Not Allowed"


class InsufficientCredits(ApiError):
    status_code = 406
    default_message = "Not enough credits"

    def __init__(self, *, balance: Decimal, price: Decimal) -> None:
        self.balance = balance
        self.price = price
        # The balance the ledger saw when it refused, not the one read at authentication: another
        # request may have spent in between, and the header must agree with the message.
        super().__init__(
            f"Not enough credits: this request costs {price}, the balance is {balance}",
            headers={REMAINING_CREDITS: format_credits(balance)},
        )


class InvalidContentType(ApiError):
    status_code = 406
    default_message = "Invalid content type: send the parameters as JSON (Content-Type: application/json)"


class InvalidRequest(ApiError):
    status_code = 422

    def __init__(self, message: str | None = None, *, param: str | None = None) -> None:
        # The field the problem is about, where one is: OpenAI's error object names it.
        self.param = param
        super().__init__(message)


class Overloaded(ApiError):
    status_code = 429
    default_message = "Too many requests: the generation queue is full, retry later"

    def __init__(self, message: str | None = None, *, retry_after_s: int) -> None:
        # Both headers, as on the per-key rate limit's 429: clients of either read one or the other.
        headers = {
            "Retry-After": str(retry_after_s),
            "x-rate-limit-reset-at-utc": reset_at_utc(time.time() + retry_after_s),
        }
        super().__init__(message, headers=headers)


class RateLimited(ApiError):
    status_code = 429
    default_message = "Too many requests: this key's rate limit is reached, retry later"


class PayloadTooLarge(ApiError):
    status_code = 413
    default_message = "Request body too large"


class ClientDisconnected(ApiError):
    # nginx's "client closed request": nobody reads it, but the access log says what happened.
    status_code = 499
    default_message = "Client closed the request; the job was cancelled and refunded"


class InternalError(ApiError):
    # A bug or a failure no class above covers: the body says where the log has the details.
    status_code = 500


class GenerationFailed(ApiError):
    status_code = 500
    default_message = "The server failed to generate the image; no credits were charged"


class DatabaseUnavailable(ApiError):
    # The ledger's database refused a read or write (locked past its busy timeout, disk full, gone).
    # Whatever the request had reserved is refunded by the serving layer, retried until it lands.
    status_code = 503
    default_message = "The server's database is unavailable; retry later"


class KeyNameTaken(Exception):
    """`keys create` with a name that already exists."""


class UnknownKey(Exception):
    """A CLI operation on a key name that does not exist."""


class BalanceLimitExceeded(Exception):
    """A grant that would take a key's balance past the maximum (server/credits.py `MAX_CREDITS`)."""


# A charge's states, as the ledger refuses them. Each also keeps the built-in base it replaced, so
# that a caller written against LookupError/ValueError still catches it.
class ChargeNotFound(LookupError):
    """Settling or refunding a request id that no charge was reserved for."""


class ChargeAlreadyFinal(ValueError):
    """Settling a charge that was refunded: its credits went back, and a settle cannot take them again."""


class RequestAlreadyCharged(ValueError):
    """Reserving for a request id that already has a charge: one request is charged once."""
