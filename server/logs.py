"""Logging: one JSON object per line (or readable text), each carrying the request's id.

structlog renders both our own records and the standard-library ones (uvicorn, diffusers), so
every line of the server has one shape. A middleware gives each HTTP request an id, binds it to
the log context (so a failure logged deep in serving carries it) and returns it in `x-request-id`.
API keys are never logged: the access line names the key by its name, never by its value.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = b"x-request-id"
SHARED_PROCESSORS: list[structlog.types.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]
# Through the standard library even before `configure_logging`: an app embedded in a test or a
# benchmark then logs only what its host's logging lets through, instead of printing every line.
structlog.configure(
    processors=[*SHARED_PROCESSORS, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
    logger_factory=structlog.stdlib.LoggerFactory(),
    wrapper_class=structlog.stdlib.BoundLogger,
    cache_logger_on_first_use=True,
)
access_log = structlog.get_logger("sd3.access")
IMPORT_NARRATORS = ("torchao", "torch.utils._pytree")


def configure_logging(*, level: str, fmt: str) -> None:
    """Route every logger through one handler on standard error; `fmt` is json, text or auto."""
    shared = SHARED_PROCESSORS
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    handler = logging.StreamHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Our access line replaces uvicorn's (which has no request id); its error log stays.
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # Alembic narrates every start-up's schema check at INFO ("Context impl SQLiteImpl", "Will assume
    # transactional DDL"): noise for an operator. Its warnings and errors still come through.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))
    quiet_import_narrators(level)


def quiet_import_narrators(level: str) -> None:
    """Hold back the warnings a model load's imports print but no operator can act on.

    diffusers imports torchao wherever it is installed (`.[quant]`), and that import warns of every
    optional kernel torchao could not load (mxfp8, CUTLASS sm90a, triton) and of its enums that torch
    registers, though no mode here uses them: a "Failed to load" at every start reads as a fault.
    Their errors still come through, and everything at log level debug.
    """
    quiet = logging.ERROR if logging.getLevelName(level.upper()) != logging.DEBUG else logging.NOTSET
    for name in IMPORT_NARRATORS:
        logging.getLogger(name).setLevel(quiet)


class RequestContext:
    """Assign a request id, bind it for logging, return it, and log one access line per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Our own id, always: a client-sent one is logged beside it but never trusted as a key
        # (it also names the request's charge in the ledger, so it must be unique).
        request_id = str(uuid.uuid4())
        scope.setdefault("state", {})["request_id"] = request_id
        client_id = dict(scope["headers"]).get(REQUEST_ID_HEADER)
        started = time.perf_counter()
        status = 500

        async def with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER]
                message["headers"] = [*headers, (REQUEST_ID_HEADER, request_id.encode())]
            await send(message)

        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            await self.app(scope, receive, with_id)
        finally:
            state = scope.get("state", {})
            access_log.info(
                "request",
                method=scope["method"],
                path=scope["path"],
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
                key=state.get("key_name"),
                client_request_id=client_id.decode("latin-1") if client_id else None,
            )
            structlog.contextvars.clear_contextvars()
