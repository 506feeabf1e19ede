"""The OpenAI images surface: `POST /v1/images/generations`.

So that code written for OpenAI's images API — the official `openai` SDK with
`base_url=".../v1"`, and the many tools built on it — runs against this server unchanged. The
request is translated into the Segmind body (`Txt2ImgRequest`) and goes through the same serving
call as v1, so pricing, credits, the queue and the history are exactly those of the equivalent
Segmind request.

Translation:
- `prompt` → prompt; `n` (1-4) → samples; `size` "WxH" (each 512-2048, a multiple of 8; "auto" is
  1024x1024) → img_width / img_height;
- `negative_prompt`, `seed`, `num_inference_steps`, `guidance_scale`, `scheduler` are extensions
  passed through (the SDK sends them with `extra_body=`);
- `model` is accepted whatever it says (clients must send one; there is one model here), and
  `quality`, `style`, `user` and the other OpenAI-only fields are ignored;
- `response_format` "url" (OpenAI's default) or "b64_json". A URL points at `/v1/outputs/<id>.jpg`
  (server/outputs.py), absolute and built from the incoming request, proxies included.

Errors carry OpenAI's body, `{"error": {"message", "type", "param", "code"}}`, because the SDK
reads the message from there, and keep our status codes except one: invalid input is 400, not
422, since OpenAI answers 400 and its SDK raises `BadRequestError` for it. Not enough credits stays
406: OpenAI's own choice for an empty quota, 429, would make the SDK retry a request that cannot
succeed. The shared handlers (server/errors.py) speak Segmind's shape, so this route maps the
domain errors itself.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field, ValidationError, field_validator

from server.api.segmind import authenticated, cancel_on_disconnect
from server.encoding import to_base64
from server.errors import ApiError, InvalidRequest
from server.headers import credit_headers, generation_headers
from server.schemas import MAX_PROMPT_CHARS, LaxBody, Txt2ImgRequest, describe_validation_errors
from server.serving import Serving
from server.urls import public_base_url

router = APIRouter()

MIN_SIDE, MAX_SIDE, SIDE_STEP = 512, 2048, 8
DEFAULT_SIZE = (1024, 1024)
_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")
SIZE_RULE = (
    f"must be 'auto' or 'WIDTHxHEIGHT' with each side {MIN_SIDE}-{MAX_SIDE} and a multiple of {SIDE_STEP}"
)

# Fields of the Segmind body an OpenAI client may send as extensions, unchanged.
PASSED_THROUGH = ("negative_prompt", "seed", "num_inference_steps", "guidance_scale", "scheduler")
# Segmind field → the OpenAI field the client actually sent, so that error messages name the latter.
_OPENAI_NAME = {"samples": "n", "img_width": "size", "img_height": "size"}

# OpenAI's error `type` (and `code`) for each of our status codes.
_ERROR_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", "invalid_value"),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    406: ("insufficient_quota", "insufficient_quota"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    499: ("client_closed_request", None),
}


class ImageGenerationRequest(LaxBody):
    """OpenAI's `images.generate` body, with the Segmind extensions this server understands."""

    # Unknown fields (quality, style, user, background, moderation, ...) are ignored (LaxBody), as
    # Segmind bodies' unknown fields are: clients send what OpenAI's newer models take.

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    n: int = Field(1, ge=1, le=4)
    size: str = "auto"
    response_format: Literal["url", "b64_json"] = "url"
    # Only JPEG is produced; a client asking for PNG or WebP bytes must hear so rather than get JPEG.
    output_format: Literal["jpeg"] = "jpeg"

    negative_prompt: str | None = None
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None

    @field_validator("size")
    @classmethod
    def _valid_size(cls, value: str) -> str:
        parse_size(value)
        return value

    def to_txt2img(self) -> Txt2ImgRequest:
        width, height = parse_size(self.size)
        fields: dict[str, Any] = {
            "prompt": self.prompt,
            "samples": self.n,
            "img_width": width,
            "img_height": height,
            # The images travel as base64 or as output files, never as a raw body.
            "base64": True,
        }
        fields.update(
            {name: getattr(self, name) for name in PASSED_THROUGH if getattr(self, name) is not None}
        )
        return Txt2ImgRequest.model_validate(fields)


def parse_size(size: str) -> tuple[int, int]:
    """ "auto" or "WIDTHxHEIGHT" → (width, height) within the Segmind ranges; ValueError otherwise."""
    text = size.strip().lower()
    if text == "auto":
        return DEFAULT_SIZE
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(SIZE_RULE)
    width, height = int(match.group(1)), int(match.group(2))
    for side in (width, height):
        if not MIN_SIDE <= side <= MAX_SIDE or side % SIDE_STEP:
            raise ValueError(SIZE_RULE)
    return width, height


def _openai_names(errors: list[Any]) -> list[Any]:
    renamed = []
    for err in errors:
        loc = tuple(_OPENAI_NAME.get(str(part), part) for part in err.get("loc", ()))
        renamed.append({**err, "loc": loc})
    return renamed


def _first_param(errors: list[Any]) -> str | None:
    for err in errors:
        loc = [str(part) for part in err.get("loc", ()) if part != "body"]
        if loc:
            return loc[0]
    return None


class OpenAIInvalidRequest(InvalidRequest):
    """Invalid input, with the OpenAI field it concerns (OpenAI's error body has a `param`)."""

    status_code = 400

    def __init__(self, message: str, *, param: str | None) -> None:
        self.param = param
        super().__init__(message)


async def _read_body(request: Request) -> ImageGenerationRequest:
    raw = await request.body()
    try:
        payload = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise OpenAIInvalidRequest(f"The body is not valid JSON ({exc})", param=None) from None
    if not isinstance(payload, dict):
        raise OpenAIInvalidRequest("The body must be a JSON object with at least a 'prompt'", param=None)
    try:
        return ImageGenerationRequest.model_validate(payload)
    except ValidationError as exc:
        errors = list(exc.errors())
        raise OpenAIInvalidRequest(describe_validation_errors(errors), param=_first_param(errors)) from None


def _to_txt2img(body: ImageGenerationRequest) -> Txt2ImgRequest:
    try:
        return body.to_txt2img()
    except ValidationError as exc:  # a passed-through extension out of the Segmind range
        errors = _openai_names(list(exc.errors()))
        raise OpenAIInvalidRequest(describe_validation_errors(errors), param=_first_param(errors)) from None


def _error_response(request: Request, exc: ApiError) -> JSONResponse:
    kind, code = _ERROR_KINDS.get(exc.status_code, ("server_error", None))
    error: dict[str, Any] = {
        "message": exc.message,
        "type": kind,
        "param": getattr(exc, "param", None),
        "code": code,
    }
    # credit_headers: `x-remaining-credits` on every answer to an authenticated request, errors too;
    # the error's own headers (Retry-After, the refunded balance) win.
    headers = {**credit_headers(request), **exc.headers}
    return JSONResponse({"error": error}, status_code=exc.status_code, headers=headers)


@router.post("/v1/images/generations", response_model=None)
async def generate_images(request: Request) -> JSONResponse:
    serving: Serving = request.app.state.serving
    try:
        key = await authenticated(request)
        # OpenAI bodies are always JSON; the content type is not checked (the SDK always sets it).
        body = await _read_body(request)
        txt2img = _to_txt2img(body)
        rate_headers = serving.rate_check(key)
        # URLs are saved inside the serving call, so a failed save is refunded like any failure.
        as_urls = body.response_format == "url"
        outcome = await cancel_on_disconnect(
            request,
            serving.txt2img(
                key, txt2img, surface="openai", keep_outputs=as_urls, request_id=request.state.request_id
            ),
        )
        if as_urls:
            base = public_base_url(request)
            data = [{"url": f"{base}/v1/outputs/{output_id}.jpg"} for output_id in outcome.outputs]
        else:
            data = [{"b64_json": to_base64(jpeg)} for jpeg in outcome.jpegs]
    except OpenAIInvalidRequest as exc:
        return _error_response(request, exc)
    except InvalidRequest as exc:  # any other validation failure below: still OpenAI's 400
        return _error_response(request, OpenAIInvalidRequest(exc.message, param=None))
    except ApiError as exc:
        return _error_response(request, exc)
    headers = rate_headers | generation_headers(
        request,
        balance=outcome.balance,
        cost=outcome.cost,
        seconds=outcome.seconds,
        seed=outcome.seed,
        request_id=outcome.request_id,
    )
    payload = {
        "created": int(time.time()),
        "data": data,
        "output_format": "jpeg",
        "size": f"{txt2img.img_width}x{txt2img.img_height}",
    }
    return JSONResponse(payload, headers=headers)
