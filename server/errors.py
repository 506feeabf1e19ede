"""The error taxonomy of sd3-server, and the one place that maps it to HTTP.

Everything below `server/api/` raises one of these domain errors; `install_error_handlers` turns
them (and Starlette's own 404/405 and FastAPI's request-validation errors) into
`{"error": "..."}` bodies with the contract's status codes. Every expected failure has its class:
the catch-all `Exception` handler is a last resort for bugs only, since Starlette runs it outside
our middleware and the headers of the contract are lost there. Unexpected failures during
generation are wrapped in `GenerationFailed` by the serving layer, which is where the refund
happens; a failure of the database itself, wherever it surfaces, is a JSON 503
(`DatabaseUnavailable`), never Starlette's plain-text 500.
"""

from __future__ import annotations

import logging
import time
from decimal import Decimal
from typing import TYPE_CHECKING

from server.headers import REMAINING_CREDITS, format_credits
from server.rate_limit import reset_at_utc

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger(__name__)


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


def install_error_handlers(app: FastAPI) -> None:
    # Imported here so that the domain errors above stay importable without the web stack.
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from sqlalchemy.exc import SQLAlchemyError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from server.headers import credit_headers

    def respond(request: Request, status: int, message: str, headers: dict[str, str]) -> JSONResponse:
        return JSONResponse(
            {"error": message}, status_code=status, headers={**credit_headers(request), **headers}
        )

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return respond(request, exc.status_code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return respond(request, 404, NotFound.default_message, {})
        if exc.status_code == 405:
            allow = dict(exc.headers or {})
            method = request.method
            return respond(request, 405, f"Method Not Allowed: {method} is not allowed here", allow)
        return respond(request, exc.status_code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(SQLAlchemyError)
    async def _database_error(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        # SQLAlchemy's text names the statement, which helps an operator; its bound parameters (a key's
        # hash) are not in it: every engine the server builds hides them (hide_parameters).
        log.error("database failure on %s %s: %s", request.method, request.url.path, exc)
        return respond(request, 503, DatabaseUnavailable.default_message, {"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        from server.schemas import describe_validation_errors

        return respond(request, 422, describe_validation_errors(exc.errors()), {})

    # Last resort for a bug or an unexpected failure (a broken database, say): Starlette calls this
    # outermost, outside our middleware, so the answer carries no credit headers, but it is still
    # the contract's JSON and not Starlette's text/plain "Internal Server Error". Starlette logs
    # the traceback after the response is sent.
    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", None)
        where = f" (request {request_id}: the server's log has the details)" if request_id else ""
        return JSONResponse({"error": f"Internal server error{where}"}, status_code=500)
