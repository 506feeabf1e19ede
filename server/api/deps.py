"""What routes receive instead of a raw request: the serving object, the calling key, a typed body.

Each is an `Annotated[..., Depends(...)]` type. FastAPI resolves a route's dependencies in the
order they are declared, sub-dependencies first, and the body dependencies declare the key and the
content-type check as their own: so whatever a route's signature says, the contract's order of
checks holds — auth (401), then the content type (406), then validation (422) — and the body is
read only after the key is known.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError

from server.errors import InvalidContentType, InvalidRequest
from server.headers import remember_balance
from server.ledger import KeyRecord
from server.schemas import Img2ImgRequest, SD35Request, Txt2ImgRequest, clip_echo, describe_validation_errors
from server.serving import Serving

M = TypeVar("M", bound=BaseModel)


async def serving_of(request: Request) -> Serving:
    serving: Serving = request.app.state.serving
    return serving


ServingDep = Annotated[Serving, Depends(serving_of)]


def served(slug: str) -> Any:
    """A route dependency: 404 when the loaded weights do not serve `slug` (docs/contract.md §9).

    Given as the route's `dependencies`, which FastAPI resolves before the signature's: a slug the
    server does not serve is refused before the key is looked up, so nothing can be charged.
    """

    async def check(serving: ServingDep) -> None:
        serving.require_served(slug)

    return Depends(check)


def sent_key(request: Request) -> str | None:
    """The key a client sent: Segmind's `x-api-key`, or `Authorization: Bearer KEY` as OpenAI's
    clients (and many HTTP tools) send it. Every surface takes both."""
    if key := request.headers.get("x-api-key"):
        return key
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def authenticated_key(request: Request, serving: ServingDep) -> KeyRecord:
    key = await serving.authenticate(sent_key(request))
    # Every answer from here on, errors included, carries the balance (server/headers.py).
    remember_balance(request, key.balance)
    request.state.key_name = key.name  # for the access log: a name, never the key
    return key


CurrentKey = Annotated[KeyRecord, Depends(authenticated_key)]


def is_json(content_type: str | None) -> bool:
    # A missing Content-Type is read as JSON (minimal clients omit it); a different one is refused,
    # as the hosted service does (406 "Invalid content type").
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def compressed_body_problem(request: Request) -> str | None:
    """Why a compressed body is refused, as a sentence; None for a body sent as is."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return None
    # The body reaches us as sent: a compressed one would be read as broken JSON, a puzzling error.
    return f"Content-Encoding {clip_echo(encoding)!r} is not accepted: send the JSON uncompressed"


async def json_content_type(request: Request, _key: CurrentKey) -> None:
    if not is_json(request.headers.get("content-type")):
        raise InvalidContentType()
    if (problem := compressed_body_problem(request)) is not None:
        raise InvalidContentType(problem)


JsonContentType = Annotated[None, Depends(json_content_type)]


async def validated_json(request: Request, model: type[M], *, when_empty: bytes) -> M:
    """The body as `model`, lax as the model is; `InvalidRequest` (422) naming each field otherwise.

    `when_empty` is what an empty body means: `null` (missing fields) or `{}` (the defaults).
    """
    try:
        return model.model_validate_json(await request.body() or when_empty)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_errors(exc.errors())) from None


async def txt2img_body(request: Request, _key: CurrentKey, _json: JsonContentType) -> Txt2ImgRequest:
    return await validated_json(request, Txt2ImgRequest, when_empty=b"null")


Txt2ImgBody = Annotated[Txt2ImgRequest, Depends(txt2img_body)]


async def img2img_body(request: Request, _key: CurrentKey, _json: JsonContentType) -> Img2ImgRequest:
    return await validated_json(request, Img2ImgRequest, when_empty=b"null")


Img2ImgBody = Annotated[Img2ImgRequest, Depends(img2img_body)]


def sd35_body(model: type[SD35Request]) -> Callable[..., Awaitable[SD35Request]]:
    """The body dependency of one SD3.5 slug: its own defaults and ranges (server/schemas.py)."""

    async def body(request: Request, _key: CurrentKey, _json: JsonContentType) -> SD35Request:
        return await validated_json(request, model, when_empty=b"null")

    return body
