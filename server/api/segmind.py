"""The Segmind surface: `POST /v1/stable-diffusion-3-medium-txt2img` and the credit balance.

A route reads the request, authenticates, validates, calls one serving method and shapes the
answer; pricing, credits and the device live below it (server/serving.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from anyio import to_thread
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from schedulers.names import public_names
from server.auth import authenticate
from server.encoding import to_base64
from server.errors import ClientDisconnected, InvalidContentType, InvalidRequest
from server.headers import credit_headers, generation_headers, remember_balance
from server.ledger import KeyRecord
from server.schemas import Txt2ImgRequest, describe_validation_errors, parse_txt2img
from server.serving import Serving

SLUG = "stable-diffusion-3-medium-txt2img"
# How often a waiting request checks that its client is still there.
DISCONNECT_POLL_S = 0.25
T = TypeVar("T")

router = APIRouter()


def sent_key(request: Request) -> str | None:
    """The key a client sent: Segmind's `x-api-key`, or `Authorization: Bearer KEY` as OpenAI's
    clients (and many HTTP tools) send it. Every surface takes both."""
    if key := request.headers.get("x-api-key"):
        return key
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def authenticated(request: Request) -> KeyRecord:
    """The calling key, from `x-api-key` or a Bearer token."""
    serving: Serving = request.app.state.serving
    key = await to_thread.run_sync(authenticate, serving.ledger, sent_key(request))
    remember_balance(request, key.balance)
    request.state.key_name = key.name  # for the access log: a name, never the key
    return key


def _is_json(content_type: str | None) -> bool:
    # A missing Content-Type is read as JSON (minimal clients omit it); a different one is refused,
    # as the hosted service does (406 "Invalid content type").
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


async def read_body(request: Request) -> Txt2ImgRequest:
    if not _is_json(request.headers.get("content-type")):
        raise InvalidContentType()
    try:
        return parse_txt2img(await request.body())
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_errors(exc.errors())) from None


@router.post(
    f"/v1/{SLUG}",
    response_model=None,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": Txt2ImgRequest.model_json_schema()}},
        }
    },
)
@router.post(f"/{SLUG}", response_model=None, include_in_schema=False)
async def txt2img(request: Request) -> Response:
    key = await authenticated(request)
    body = await read_body(request)
    serving: Serving = request.app.state.serving
    rate_headers = serving.rate_check(key)
    outcome = await cancel_on_disconnect(
        request, serving.txt2img(key, body, request_id=request.state.request_id)
    )
    headers = rate_headers | generation_headers(
        request,
        balance=outcome.balance,
        cost=outcome.cost,
        seconds=outcome.seconds,
        seed=outcome.seed,
        request_id=outcome.request_id,
    )
    if len(outcome.jpegs) == 1 and not body.base64:
        return Response(outcome.jpegs[0], media_type="image/jpeg", headers=headers)
    # base64, or several images that one raw body cannot carry (docs/contract.md §1.3).
    encoded = [to_base64(jpeg) for jpeg in outcome.jpegs]
    payload: dict[str, object] = {"image": encoded[0]}
    if len(encoded) > 1:
        payload["images"] = encoded
    return JSONResponse(payload, headers=headers)


async def cancel_on_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await `work`, cancelling it if the client goes away first.

    Cancelling reaches the queue (a waiting job is dropped, a running one stops at its next step)
    and the serving layer refunds the reservation, so a client that gives up is not charged.
    """
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            try:
                return await task  # it finished before the cancel landed: a normal (unread) answer
            except asyncio.CancelledError:
                raise ClientDisconnected() from None


@router.get("/v1/get-user-credits")
async def user_credits(request: Request) -> JSONResponse:
    key = await authenticated(request)
    return JSONResponse({"credits": float(key.balance), "free-credits": 0}, headers=credit_headers(request))


@router.get("/v1/schedulers")
async def schedulers() -> dict[str, object]:
    return {"schedulers": public_names(), "default": "DPM++ 2M"}
