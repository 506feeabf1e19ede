"""Operations: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> dict[str, object]:
    """Liveness: the process answers (also during a generation: the device has its own thread)."""
    state = request.app.state
    return {"status": "ok", "model": state.model_description, "device": str(state.device)}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: the model is loaded (it is, once the app serves) and the queue takes new jobs.

    A load balancer should send traffic elsewhere on 503 rather than collect 429s.
    """
    queue = request.app.state.serving.queue
    body = {"ready": queue.has_room, "queue": {"pending": queue.pending, "max_pending": queue.max_pending}}
    return JSONResponse(body, status_code=200 if queue.has_room else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
