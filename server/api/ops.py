"""Operations: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.deps import ServingDep
from server.api.renderers import SegmindRoute

router = APIRouter(route_class=SegmindRoute)


@router.get("/health")
async def health(request: Request) -> dict[str, object]:
    """Liveness: the process answers (also during a generation: the device has its own thread)."""
    state = request.app.state
    return {"status": "ok", "model": state.model_description, "device": str(state.device)}


@router.get("/ready")
async def ready(serving: ServingDep) -> JSONResponse:
    """Readiness: the database answers the reads every request makes, and the queue takes new jobs.

    A load balancer should send traffic elsewhere on 503 rather than collect 429s or 500s.
    """
    readiness = await serving.readiness()
    body = {
        "ready": readiness.ok,
        "database": readiness.database_problem or "ok",
        "queue": {"pending": readiness.pending, "max_pending": readiness.max_pending},
    }
    return JSONResponse(body, status_code=200 if readiness.ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
