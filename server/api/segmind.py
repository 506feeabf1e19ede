"""The Segmind surface: `POST /v1/stable-diffusion-3-medium-txt2img`, `POST /v1/sd3-med-img2img` and
the credit balance.

A route receives the serving object, the calling key and the validated body (server/api/deps.py),
makes one serving call and shapes the answer; pricing, credits and the device live below it
(server/serving.py). Errors answer in Segmind's `{"error": "..."}` (server/api/renderers.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from schedulers.names import public_names
from schedulers.sigmas import SCHEDULES
from server.api.cancellation import cancel_on_disconnect
from server.api.deps import CurrentKey, Img2ImgBody, ServingDep, Txt2ImgBody
from server.api.renderers import SegmindRoute
from server.encoding import to_base64
from server.headers import credit_headers, generation_headers
from server.schemas import IMG2IMG_SLUG, SLUG, Img2ImgRequest, Txt2ImgRequest
from server.serving import Txt2ImgOutcome

router = APIRouter(route_class=SegmindRoute)


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The route's body for the OpenAPI document: a dependency reads it (lax coercion, the contract's
    error order), so FastAPI cannot document it on its own."""
    content = {"application/json": {"schema": model.model_json_schema()}}
    return {"requestBody": {"required": True, "content": content}}


@router.post(f"/v1/{SLUG}", response_model=None, openapi_extra=_json_body(Txt2ImgRequest))
@router.post(f"/{SLUG}", response_model=None, include_in_schema=False)
@cancel_on_disconnect
async def txt2img(request: Request, serving: ServingDep, key: CurrentKey, body: Txt2ImgBody) -> Response:
    outcome = await serving.txt2img(key, body, request_id=request.state.request_id)
    return _images(request, outcome, as_base64=body.base64)


@router.post(f"/v1/{IMG2IMG_SLUG}", response_model=None, openapi_extra=_json_body(Img2ImgRequest))
@router.post(f"/{IMG2IMG_SLUG}", response_model=None, include_in_schema=False)
@cancel_on_disconnect
async def img2img(request: Request, serving: ServingDep, key: CurrentKey, body: Img2ImgBody) -> Response:
    outcome = await serving.img2img(key, body, request_id=request.state.request_id)
    return _images(request, outcome, as_base64=body.base64)


def _images(request: Request, outcome: Txt2ImgOutcome, *, as_base64: bool) -> Response:
    headers = outcome.rate_headers | generation_headers(
        request,
        balance=outcome.balance,
        cost=outcome.cost,
        seconds=outcome.seconds,
        seed=outcome.seed,
        request_id=outcome.request_id,
    )
    if len(outcome.jpegs) == 1 and not as_base64:
        return Response(outcome.jpegs[0], media_type="image/jpeg", headers=headers)
    # base64, or several images that one raw body cannot carry (docs/contract.md §1.3).
    encoded = [to_base64(jpeg) for jpeg in outcome.jpegs]
    payload: dict[str, object] = {"image": encoded[0]}
    if len(encoded) > 1:
        payload["images"] = encoded
    return JSONResponse(payload, headers=headers)


@router.get("/v1/get-user-credits")
async def user_credits(request: Request, key: CurrentKey) -> JSONResponse:
    return JSONResponse({"credits": float(key.balance), "free-credits": 0}, headers=credit_headers(request))


@router.get("/v1/schedulers")
async def schedulers() -> dict[str, object]:
    """txt2img's `scheduler` names (the top-level keys, as before), and what each slug's name fields take."""
    names = public_names()
    return {
        "schedulers": names,
        "default": "DPM++ 2M",
        "models": {
            SLUG: {"scheduler": {"accepted": names, "default": "DPM++ 2M"}},
            IMG2IMG_SLUG: {
                # Any sampler name; a label's schedule part is not used: `scheduler` names the schedule.
                "sampler": {"accepted": names, "default": "dpmpp_2m"},
                "scheduler": {"accepted": list(SCHEDULES), "default": "sgm_uniform"},
            },
        },
    }
