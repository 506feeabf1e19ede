"""Operations: liveness."""

from __future__ import annotations

from fastapi import APIRouter, Request

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> dict[str, object]:
    # Liveness only: the process answers. (The model is loaded before the server accepts requests.)
    state = request.app.state
    return {"status": "ok", "model": state.model_description, "device": str(state.device)}
