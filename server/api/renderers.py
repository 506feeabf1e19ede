"""Errors on the wire: one renderer per wire format, chosen by the router a route belongs to.

Two formats: Segmind's `{"error": "<message>"}` (the `segmind` SDK raises
`SegmindError(status, detail=body["error"])`) and OpenAI's error object
`{"error": {"message", "type", "param", "code"}}` (the `openai` SDK reads the message and the
code from there). A router picks its format with its route class (`SegmindRoute`, `OpenAIRoute`):
the route's handler renders whatever its dependencies or endpoint raise, bugs included, so the
answer still passes through our middleware and keeps the request id and the credit headers.
`install_error_handlers` covers what happens outside any route (an unknown path, a wrong method)
in Segmind's format, the server's default.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from server.errors import (
    ApiError,
    ClientDisconnected,
    DatabaseUnavailable,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
)
from server.headers import credit_headers
from server.schemas import describe_validation_errors

log = logging.getLogger(__name__)

# How long a client should wait before retrying after the database refused (503).
DATABASE_RETRY_AFTER_S = 5

# OpenAI's error `type` and `code` for each of our status codes.
_OPENAI_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", "invalid_value"),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    406: ("insufficient_quota", "insufficient_quota"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    499: ("client_closed_request", None),
}


def as_api_error(request: Request, exc: Exception) -> ApiError:
    """Any failure in the taxonomy's terms, which is all a renderer needs to know."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestValidationError):  # a query or path parameter FastAPI validated
        return InvalidRequest(describe_validation_errors(exc.errors()))
    if isinstance(exc, ClientDisconnect):  # gone while its body was being read
        return ClientDisconnected()
    if isinstance(exc, SQLAlchemyError):
        # SQLAlchemy's text names the statement, which helps an operator; its bound parameters (a key's
        # hash) are not in it: every engine the server builds hides them (hide_parameters).
        log.error("database failure on %s %s: %s", request.method, request.url.path, exc)
        return DatabaseUnavailable(headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)})
    if isinstance(exc, StarletteHTTPException):
        headers = dict(exc.headers or {})
        if exc.status_code == 404:
            return NotFound(headers=headers)
        if exc.status_code == 405:
            return MethodNotAllowed(
                f"Method Not Allowed: {request.method} is not allowed here", headers=headers
            )
        error = ApiError(str(exc.detail), headers=headers)
        error.status_code = exc.status_code
        return error
    request_id = getattr(request.state, "request_id", None)
    where = f" (request {request_id}: the server's log has the details)" if request_id else ""
    return InternalError(f"Internal server error{where}")


def _headers(request: Request, error: ApiError) -> dict[str, str]:
    # `x-remaining-credits` on every answer to an authenticated request, errors too; the error's own
    # headers (Retry-After, the balance after a refund) win.
    return {**credit_headers(request), **error.headers}


def segmind_error(request: Request, error: ApiError) -> Response:
    return JSONResponse(
        {"error": error.message}, status_code=error.status_code, headers=_headers(request, error)
    )


def openai_error(request: Request, error: ApiError) -> Response:
    """OpenAI's error object. Our status codes are kept but one: invalid input is 400, not 422, as
    OpenAI answers it (its SDK raises `BadRequestError`). Not enough credits stays 406: OpenAI's own
    429 for an empty quota would make the SDK retry a request that cannot succeed."""
    status = 400 if isinstance(error, InvalidRequest) else error.status_code
    kind, code = _OPENAI_KINDS.get(status, ("server_error", None))
    body = {
        "message": error.message,
        "type": kind,
        "param": error.param if isinstance(error, InvalidRequest) else None,
        "code": code,
    }
    return JSONResponse({"error": body}, status_code=status, headers=_headers(request, error))


class SegmindRoute(APIRoute):
    """A route whose failures are answered in Segmind's format; a subclass changes the format."""

    def render_error(self, request: Request, error: ApiError) -> Response:
        return segmind_error(request, error)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def rendering_errors(request: Request) -> Response:
            try:
                return await handle(request)
            except Exception as exc:
                error = as_api_error(request, exc)
                if isinstance(error, InternalError):
                    log.error("unhandled failure on %s %s", request.method, request.url.path, exc_info=exc)
                return self.render_error(request, error)

        return rendering_errors


class OpenAIRoute(SegmindRoute):
    def render_error(self, request: Request, error: ApiError) -> Response:
        return openai_error(request, error)


def install_error_handlers(app: FastAPI) -> None:
    """Segmind's format for what fails outside any route: no path matched (404), a wrong method
    (405), a failure in a middleware. Starlette answers the last one outside our middleware, so
    that answer carries no contract headers, but it is still JSON, never its text/plain 500."""

    async def outside_routes(request: Request, exc: Exception) -> Response:
        return segmind_error(request, as_api_error(request, exc))

    app.add_exception_handler(StarletteHTTPException, outside_routes)
    app.add_exception_handler(ApiError, outside_routes)
    app.add_exception_handler(Exception, outside_routes)
