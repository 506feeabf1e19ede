"""The v2 asynchronous surface (the `segmind` SDK's default `run()`), and the request history.

`POST /v2/<slug>` answers at once with the job's URLs; clients poll the status URL until
COMPLETED or FAILED and then GET the response URL. A FAILED job's bodies come with HTTP 422, as
the hosted service sends them (the SDK reads the body first). A job is visible only to the key
that submitted it; to any other key it does not exist (404).
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from server.api.deps import CurrentKey, Img2ImgBody, ServingDep, Txt2ImgBody, sd35_body, served
from server.api.renderers import SegmindRoute
from server.errors import InvalidRequest, NotFound
from server.headers import credit_headers, format_credits
from server.job_store import JobRecord
from server.outputs import SUFFIXES
from server.schemas import (
    IMG2IMG_SLUG,
    SD35_REQUESTS,
    SLUG,
    UNSERVED_SLUGS,
    Img2ImgRequest,
    PlainInt,
    SD35Request,
    Txt2ImgRequest,
    recorded_params,
)
from server.urls import public_base_url

router = APIRouter(route_class=SegmindRoute)


def _urls(request: Request, request_id: str) -> dict[str, str]:
    base = public_base_url(request)
    return {
        "status_url": f"{base}/v2/requests/{request_id}/status",
        "response_url": f"{base}/v2/requests/{request_id}",
        "poll_url": f"{base}/v1/requests/{request_id}",  # the hosted service's v1 alias
    }


@router.post(f"/v2/{SLUG}", dependencies=[served(SLUG)])
@router.post(f"/v2/{SLUG}/", include_in_schema=False, dependencies=[served(SLUG)])
async def submit(request: Request, serving: ServingDep, key: CurrentKey, body: Txt2ImgBody) -> JSONResponse:
    return await _accepted(request, serving, key, body)


@router.post(f"/v2/{IMG2IMG_SLUG}", dependencies=[served(IMG2IMG_SLUG)])
@router.post(f"/v2/{IMG2IMG_SLUG}/", include_in_schema=False, dependencies=[served(IMG2IMG_SLUG)])
async def submit_img2img(
    request: Request, serving: ServingDep, key: CurrentKey, body: Img2ImgBody
) -> JSONResponse:
    return await _accepted(request, serving, key, body)


def _add_sd35(model: type[SD35Request]) -> None:
    # A default, not an `Annotated` alias: this module's annotations are strings, resolved in its
    # globals, where a local alias would not be found.
    body_of = Depends(sd35_body(model))

    @router.post(f"/v2/{model.slug}", dependencies=[served(model.slug)], name=f"submit_{model.slug}")
    @router.post(f"/v2/{model.slug}/", include_in_schema=False, dependencies=[served(model.slug)])
    async def submit_sd35(
        request: Request, serving: ServingDep, key: CurrentKey, body: SD35Request = body_of
    ) -> JSONResponse:
        return await _accepted(request, serving, key, body)


def _add_unserved(slug: str) -> None:
    @router.post(f"/v2/{slug}", include_in_schema=False, dependencies=[served(slug)])
    @router.post(f"/v2/{slug}/", include_in_schema=False, dependencies=[served(slug)])
    async def unserved() -> JSONResponse:
        raise NotFound()  # not reached: `served` refuses first


for _model in SD35_REQUESTS.values():
    _add_sd35(_model)
for _slug in UNSERVED_SLUGS:
    _add_unserved(_slug)


async def _accepted(
    request: Request,
    serving: ServingDep,
    key: CurrentKey,
    body: Txt2ImgRequest | Img2ImgRequest | SD35Request,
) -> JSONResponse:
    accepted = await serving.submit(key, body, request_id=request.state.request_id)
    job = accepted.job
    payload = {"request_id": job.request_id, "status": job.status, **_urls(request, job.request_id)}
    headers = accepted.rate_headers | {"x-remaining-credits": format_credits(accepted.balance)}
    return JSONResponse(payload, headers=headers)


def _status_body(request: Request, job: JobRecord) -> dict[str, Any]:
    body: dict[str, Any] = {
        "status": job.status,
        "request_id": job.request_id,
        **_urls(request, job.request_id),
    }
    if job.status in ("QUEUED", "PROCESSING"):
        body["progress"] = {"step": job.progress_step, "total": job.progress_total}
        body["metrics"] = {}
    if job.status == "FAILED":
        body["error"] = job.error
    return body


def _answer(request: Request, job: JobRecord, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(
        body, status_code=422 if job.status == "FAILED" else 200, headers=credit_headers(request)
    )


@router.get("/v2/requests/{request_id}/status")
async def status(request: Request, serving: ServingDep, key: CurrentKey, request_id: str) -> JSONResponse:
    job = await serving.own_job(key, request_id)
    return _answer(request, job, _status_body(request, job))


@router.get("/v2/requests/{request_id}")
@router.get("/v1/requests/{request_id}")
async def response(request: Request, serving: ServingDep, key: CurrentKey, request_id: str) -> JSONResponse:
    result = await serving.job_result(key, request_id)
    job = result.job
    if job.status != "COMPLETED" or result.balance is None:
        return _answer(request, job, _status_body(request, job))
    base = public_base_url(request)
    # The SD3.5 slugs' `image_format` is the file's; every other slug's outputs are JPEGs.
    suffix = SUFFIXES.get(str(job.params.get("image_format", "jpeg")), ".jpg")
    urls = [f"{base}/v1/outputs/{output}{suffix}" for output in job.outputs]
    body = {
        "status": "COMPLETED",
        "request_id": job.request_id,
        "error": None,
        "output": urls[0] if len(urls) == 1 else urls,
        "seed": job.seed,
        "metrics": {
            # queue_time + inference_time = total_time: all three from the job's own timestamps.
            "inference_time": job.run_s if job.run_s is not None else job.inference_s,
            "queue_time": job.queue_s,
            "total_time": job.total_s,
            "cost": float(job.cost),
            "remaining_credits": float(result.balance),
        },
    }
    return _answer(request, job, body)


def _cursor(job: JobRecord) -> str:
    """The opaque `next` cursor: base64url of the last row's UTC time and id, safe in a URL as it is
    (a "+00:00" offset pasted into a query string unencoded would arrive as a space)."""
    raw = f"{job.created_at.astimezone(timezone.utc).isoformat()}|{job.request_id}"
    return base64.urlsafe_b64encode(raw.encode()).rstrip(b"=").decode()


def _position(before: str) -> tuple[datetime, str | None]:
    """`?before=`: a cursor from `next`, or an ISO 8601 time (naive means UTC; offsets count)."""
    try:
        raw = base64.urlsafe_b64decode(before + "=" * (-len(before) % 4)).decode()
        moment, separator, request_id = raw.partition("|")
        if separator and request_id:
            return datetime.fromisoformat(moment), request_id
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    try:
        return datetime.fromisoformat(before), None
    except ValueError:
        raise InvalidRequest(
            "before: not a cursor returned by this endpoint (`next`) nor an ISO 8601 time"
        ) from None


@router.get("/v1/history")
async def history(
    request: Request,
    serving: ServingDep,
    key: CurrentKey,
    limit: Annotated[PlainInt, Query(ge=1, le=100)] = 20,
    before: Annotated[
        str | None, Query(description="The `next` cursor of the previous page, or an ISO 8601 time")
    ] = None,
) -> JSONResponse:
    """The calling key's requests, newest first, whatever surface they came through."""
    moment, request_id = (None, None) if before is None else _position(before)
    rows = await serving.history(key, limit=limit, before=moment, before_id=request_id)
    items = [
        {
            "request_id": job.request_id,
            "model_name": job.model,
            "surface": job.surface,
            "status": job.status,
            "credits_deduction": float(job.cost) if job.status == "COMPLETED" else 0.0,
            "request_body": recorded_params(job.params),
            "seed": job.seed,
            "latency_ms": None if job.total_s is None else round(job.total_s * 1000),
            "error": job.error,
            "created_at": job.created_at.isoformat(),
            "finished_at": None if job.finished_at is None else job.finished_at.isoformat(),
        }
        for job in rows
    ]
    next_cursor = _cursor(rows[-1]) if len(rows) == limit else None
    return JSONResponse({"items": items, "next": next_cursor}, headers=credit_headers(request))
