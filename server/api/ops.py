"""Operations: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import asyncio
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

router = APIRouter()

# How long /ready waits for the database: a load balancer's probe must get an answer, not hang
# on a stuck file or server, and a healthy database answers these reads in milliseconds.
DATABASE_CHECK_TIMEOUT_S = 2.0


@router.get("/health")
async def health(request: Request) -> dict[str, object]:
    """Liveness: the process answers (also during a generation: the device has its own thread)."""
    state = request.app.state
    return {"status": "ok", "model": state.model_description, "device": str(state.device)}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: the database answers the reads every request makes, and the queue takes new jobs.

    A load balancer should send traffic elsewhere on 503 rather than collect 429s or 500s.
    """
    queue = request.app.state.serving.queue
    problem = await _database_problem(request.app.state)
    ok = queue.has_room and problem is None
    body = {
        "ready": ok,
        "database": problem or "ok",
        "queue": {"pending": queue.pending, "max_pending": queue.max_pending},
    }
    return JSONResponse(body, status_code=200 if ok else 503)


async def _database_problem(state: Any) -> str | None:
    """None when the ledger's probe passes; else what is wrong, in the database's own words.

    Off the event loop, and one probe at a time: probes sent while one is stuck wait for that one
    instead of each taking a worker thread.
    """
    check: asyncio.Future[None] | None = getattr(state, "database_check", None)
    if check is None or check.done():
        check = asyncio.ensure_future(to_thread.run_sync(state.serving.ledger.probe))
        # Retrieved here, so that a probe finishing after its waiters gave up is not logged as lost.
        check.add_done_callback(lambda done: done.cancelled() or done.exception())
        state.database_check = check
    try:
        await asyncio.wait_for(asyncio.shield(check), DATABASE_CHECK_TIMEOUT_S)
    except TimeoutError:
        return f"the database did not answer within {DATABASE_CHECK_TIMEOUT_S:g} s"
    except DBAPIError as exc:
        # The driver's message alone: no statement, no parameters.
        return f"the database failed: {exc.orig}"
    except SQLAlchemyError as exc:
        return f"the database failed: {type(exc).__name__}"
    return None


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
