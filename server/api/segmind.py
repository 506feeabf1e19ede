"""The Segmind surface: `POST /v1/<slug>` (and its root alias) for the SD3 family's slugs, and the
credit balance.

Each slug answers only when the loaded weights are its family's (`served`, docs/contract.md §9);
the family's other slugs answer 404 saying what this server runs.

A route receives the serving object, the calling key and the validated body (server/api/deps.py),
makes one serving call and shapes the answer; pricing, credits and the device live below it
(server/serving.py). Errors answer in Segmind's `{"error": "..."}` (server/api/renderers.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from schedulers.names import public_names
from schedulers.sigmas import SCHEDULES
from server.api.cancellation import cancel_on_disconnect
from server.api.deps import CurrentKey, Img2ImgBody, ServingDep, Txt2ImgBody, sd35_body, served
from server.api.renderers import SegmindRoute
from server.encoding import to_base64
from server.errors import NotFound
from server.headers import credit_headers, generation_headers
from server.schemas import (
    IMG2IMG_SLUG,
    SD35_REQUESTS,
    SLUG,
    UNSERVED_SLUGS,
    Img2ImgRequest,
    SD35Request,
    Txt2ImgRequest,
)
from server.serving import Txt2ImgOutcome

router = APIRouter(route_class=SegmindRoute)


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The route's body for the OpenAPI document: a dependency reads it (lax coercion, the contract's
    error order), so FastAPI cannot document it on its own."""
    content = {"application/json": {"schema": model.model_json_schema()}}
    return {"requestBody": {"required": True, "content": content}}


@router.post(
    f"/v1/{SLUG}", response_model=None, openapi_extra=_json_body(Txt2ImgRequest), dependencies=[served(SLUG)]
)
@router.post(f"/{SLUG}", response_model=None, include_in_schema=False, dependencies=[served(SLUG)])
@cancel_on_disconnect
async def txt2img(request: Request, serving: ServingDep, key: CurrentKey, body: Txt2ImgBody) -> Response:
    outcome = await serving.txt2img(key, body, request_id=request.state.request_id)
    return _images(request, outcome, as_base64=body.base64)


@router.post(
    f"/v1/{IMG2IMG_SLUG}",
    response_model=None,
    openapi_extra=_json_body(Img2ImgRequest),
    dependencies=[served(IMG2IMG_SLUG)],
)
@router.post(
    f"/{IMG2IMG_SLUG}", response_model=None, include_in_schema=False, dependencies=[served(IMG2IMG_SLUG)]
)
@cancel_on_disconnect
async def img2img(request: Request, serving: ServingDep, key: CurrentKey, body: Img2ImgBody) -> Response:
    outcome = await serving.img2img(key, body, request_id=request.state.request_id)
    return _images(request, outcome, as_base64=body.base64)


def _add_sd35(model: type[SD35Request]) -> None:
    """The v1 route and root alias of one SD3.5 slug; its body model carries its defaults."""
    # A default, not an `Annotated` alias: this module's annotations are strings, resolved in its
    # globals, where a local alias would not be found.
    body_of = Depends(sd35_body(model))

    @router.post(
        f"/v1/{model.slug}",
        response_model=None,
        openapi_extra=_json_body(model),
        dependencies=[served(model.slug)],
        name=f"sd35_{model.slug}",
    )
    @router.post(
        f"/{model.slug}", response_model=None, include_in_schema=False, dependencies=[served(model.slug)]
    )
    @cancel_on_disconnect
    async def sd35(
        request: Request, serving: ServingDep, key: CurrentKey, body: SD35Request = body_of
    ) -> Response:
        outcome = await serving.sd35(key, body, request_id=request.state.request_id)
        return _images(request, outcome, as_base64=body.base64)


def _add_unserved(slug: str) -> None:
    """A slug of the hosted SD3 family that nothing here serves: a 404 that says why (deps.served)."""

    @router.post(f"/v1/{slug}", response_model=None, include_in_schema=False, dependencies=[served(slug)])
    @router.post(f"/{slug}", response_model=None, include_in_schema=False, dependencies=[served(slug)])
    async def unserved() -> Response:
        raise NotFound()  # not reached: `served` refuses first


for _model in SD35_REQUESTS.values():
    _add_sd35(_model)
for _slug in UNSERVED_SLUGS:
    _add_unserved(_slug)


def _images(request: Request, outcome: Txt2ImgOutcome, *, as_base64: bool) -> Response:
    headers = outcome.rate_headers | generation_headers(
        request,
        balance=outcome.balance,
        cost=outcome.cost,
        seconds=outcome.seconds,
        seed=outcome.seed,
        request_id=outcome.request_id,
    )
    if len(outcome.images) == 1 and not as_base64:
        return Response(outcome.images[0], media_type=outcome.media_type, headers=headers)
    # base64, or several images that one raw body cannot carry (docs/contract.md §1.3).
    encoded = [to_base64(image) for image in outcome.images]
    payload: dict[str, object] = {"image": encoded[0]}
    if len(encoded) > 1:
        payload["images"] = encoded
    return JSONResponse(payload, headers=headers)


@router.get("/v1/get-user-credits")
async def user_credits(request: Request, key: CurrentKey) -> JSONResponse:
    return JSONResponse({"credits": float(key.balance), "free-credits": 0}, headers=credit_headers(request))


@router.get("/v1/schedulers")
async def schedulers(serving: ServingDep) -> dict[str, object]:
    """What each served slug's name fields take, and (the top-level keys, as before) the sampler names
    every slug takes with the first served slug's default."""
    names = public_names()
    # SD3 txt2img names sampler and schedule in one `scheduler`; the others name the sampler
    # (`sampler`; a label's schedule part is not used) and the schedule (`scheduler`) apart.
    defaults = {SLUG: "DPM++ 2M", IMG2IMG_SLUG: "dpmpp_2m", **dict.fromkeys(SD35_REQUESTS, "euler")}
    models: dict[str, object] = {}
    for slug in serving.served_slugs:
        if slug == SLUG:
            models[slug] = {"scheduler": {"accepted": names, "default": defaults[slug]}}
        else:
            models[slug] = {
                "sampler": {"accepted": names, "default": defaults[slug]},
                "scheduler": {"accepted": list(SCHEDULES), "default": "sgm_uniform"},
            }
    return {"schedulers": names, "default": defaults[serving.served_slugs[0]], "models": models}
