"""The OpenAI images surface: `POST /v1/images/generations`.

So that code written for OpenAI's images API — the official `openai` SDK with
`base_url=".../v1"`, and the many tools built on it — runs against this server unchanged. The
request is translated into the Segmind body of the loaded family's txt2img slug (docs/contract.md
§9: `Txt2ImgRequest` on SD3 Medium, that family's `SD35Request` on SD3.5) and goes through the same
serving call as v1, so defaults, pricing, credits, the queue and the history are exactly those of
the equivalent Segmind request on this server.

Translation:
- `prompt` → prompt; `n` (1-4) → samples / batch_size; `size` "WxH" (each 512-2048, a multiple of
  8; "auto" is 1024x1024) → img_width / img_height, or width / height;
- extensions (the SDK sends them with `extra_body=`) are the slug's own fields, passed through:
  `negative_prompt`, `seed`, `guidance_scale`, and on SD3 Medium `num_inference_steps` and
  `scheduler` (a sampler-and-schedule label), on SD3.5 `steps`, `sampler` and `scheduler` (a
  schedule). `steps` and `num_inference_steps` are the same thing and taken on both;
- `model` is accepted whatever it says (clients must send one; there is one model here), and
  `quality`, `style`, `user` and the other OpenAI-only fields are ignored;
- `response_format` "url" (OpenAI's default) or "b64_json". A URL points at `/v1/outputs/<id>.jpg`
  (server/outputs.py), absolute and built from the incoming request, proxies included.

Errors carry OpenAI's body, `{"error": {"message", "type", "param", "code"}}`, because the SDK
reads the message from there: the router's route class picks that renderer
(server/api/renderers.py, which also says why invalid input is 400 and not enough credits 406).
"""

from __future__ import annotations

import json
import re
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import Field, ValidationError, field_validator

from server.api.cancellation import cancel_on_disconnect
from server.api.deps import CurrentKey, ServingDep, compressed_body_problem
from server.api.renderers import OpenAIRoute
from server.encoding import to_base64
from server.errors import InvalidRequest
from server.headers import generation_headers
from server.schemas import (
    MAX_PROMPT_CHARS,
    SD35_REQUESTS,
    LaxBody,
    SD35Request,
    Txt2ImgRequest,
    describe_validation_errors,
)
from server.urls import public_base_url

router = APIRouter(route_class=OpenAIRoute)

MIN_SIDE, MAX_SIDE, SIDE_STEP = 512, 2048, 8
DEFAULT_SIZE = (1024, 1024)
_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")
SIZE_RULE = (
    f"must be 'auto' or 'WIDTHxHEIGHT' with each side {MIN_SIDE}-{MAX_SIDE} and a multiple of {SIDE_STEP}"
)

# Fields of the Segmind body an OpenAI client may send as extensions, unchanged (the step count
# apart: either spelling goes to the slug's own name).
PASSED_THROUGH: tuple[str, ...] = ("negative_prompt", "seed", "guidance_scale", "scheduler")
SD35_PASSED_THROUGH: tuple[str, ...] = (*PASSED_THROUGH, "sampler")
# Segmind field → the OpenAI field the client actually sent, so that error messages name the latter.
_OPENAI_NAME = {
    "samples": "n",
    "batch_size": "n",
    "img_width": "size",
    "img_height": "size",
    "width": "size",
    "height": "size",
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
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    sampler: str | None = None

    @field_validator("size")
    @classmethod
    def _valid_size(cls, value: str) -> str:
        parse_size(value)
        return value

    def to_segmind(self, slug: str) -> Txt2ImgRequest | SD35Request:
        """The equivalent body of `slug` (the loaded family's txt2img slug), with that slug's defaults
        for what the client left out; `InvalidRequest` when an extension is out of the slug's range."""
        width, height = parse_size(self.size)
        sd35 = SD35_REQUESTS.get(slug)
        # The images travel as base64 or as output files, never as a raw body.
        fields: dict[str, Any] = {"prompt": self.prompt, "base64": True}
        if sd35 is None:
            fields |= {"samples": self.n, "img_width": width, "img_height": height}
            passed, steps_name = PASSED_THROUGH, "num_inference_steps"
        else:
            # JPEG, whatever the slug's default: `output_format` and the output URLs say so.
            fields |= {"batch_size": self.n, "width": width, "height": height, "image_format": "jpeg"}
            passed, steps_name = SD35_PASSED_THROUGH, "steps"
        fields.update({name: getattr(self, name) for name in passed if getattr(self, name) is not None})
        steps, sent_as = self._steps()
        if steps is not None:
            fields[steps_name] = steps
        try:
            return (sd35 or Txt2ImgRequest).model_validate(fields)
        except ValidationError as exc:
            errors = _openai_names(list(exc.errors()), {steps_name: sent_as})
            raise InvalidRequest(describe_validation_errors(errors), param=_first_param(errors)) from None

    def _steps(self) -> tuple[int | None, str]:
        """The step count the client sent, and under which name (either, whatever the family: a
        client of this surface need not know which model runs)."""
        if None not in (self.steps, self.num_inference_steps) and self.steps != self.num_inference_steps:
            message = "steps: differs from num_inference_steps; send one of the two"
            raise InvalidRequest(message, param="steps")
        if self.steps is not None:
            return self.steps, "steps"
        return self.num_inference_steps, "num_inference_steps"


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


def _openai_names(errors: list[Any], sent: dict[str, str]) -> list[Any]:
    names = _OPENAI_NAME | sent
    renamed = []
    for err in errors:
        loc = tuple(names.get(str(part), part) for part in err.get("loc", ()))
        renamed.append({**err, "loc": loc})
    return renamed


def _first_param(errors: list[Any]) -> str | None:
    for err in errors:
        loc = [str(part) for part in err.get("loc", ()) if part != "body"]
        if loc:
            return loc[0]
    return None


async def image_generation_body(request: Request, _key: CurrentKey) -> ImageGenerationRequest:
    # OpenAI bodies are always JSON; the content type is not checked (the SDK always sets it).
    if (problem := compressed_body_problem(request)) is not None:
        raise InvalidRequest(problem)
    raw = await request.body()
    try:
        payload = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"The body is not valid JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("The body must be a JSON object with at least a 'prompt'")
    try:
        return ImageGenerationRequest.model_validate(payload)
    except ValidationError as exc:
        errors = list(exc.errors())
        raise InvalidRequest(describe_validation_errors(errors), param=_first_param(errors)) from None


ImageGenerationBody = Annotated[ImageGenerationRequest, Depends(image_generation_body)]


@router.post("/v1/images/generations", response_model=None)
@cancel_on_disconnect
async def generate_images(
    request: Request, serving: ServingDep, key: CurrentKey, body: ImageGenerationBody
) -> JSONResponse:
    segmind = body.to_segmind(serving.txt2img_slug)
    # URLs are saved inside the serving call, so a failed save is refunded like any failure.
    as_urls = body.response_format == "url"
    request_id = request.state.request_id
    if isinstance(segmind, SD35Request):
        outcome = await serving.sd35(
            key, segmind, surface="openai", keep_outputs=as_urls, request_id=request_id
        )
    else:
        outcome = await serving.txt2img(
            key, segmind, surface="openai", keep_outputs=as_urls, request_id=request_id
        )
    if as_urls:
        base = public_base_url(request)
        data = [{"url": f"{base}/v1/outputs/{output_id}.jpg"} for output_id in outcome.outputs]
    else:
        data = [{"b64_json": to_base64(jpeg)} for jpeg in outcome.images]
    headers = outcome.rate_headers | generation_headers(
        request,
        balance=outcome.balance,
        cost=outcome.cost,
        seconds=outcome.seconds,
        seed=outcome.seed,
        request_id=outcome.request_id,
    )
    width, height = parse_size(body.size)
    payload = {
        "created": int(time.time()),
        "data": data,
        "output_format": "jpeg",
        "size": f"{width}x{height}",
    }
    return JSONResponse(payload, headers=headers)
