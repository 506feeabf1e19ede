"""Wire models: the request body of the txt2img endpoint exactly as docs/contract.md §1 gives it.

Validation happens here, at the edge, before anything is priced, reserved or queued, and every
message names the field and the rule. Real clients send numbers and booleans as strings, so the
model is lax (pydantic's default): "25" is 25 and "False" is false; `null` means the default;
unknown fields are ignored, because clients send fields of other models.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipelines.text import MAX_WEIGHT, parse_weights, weight_out_of_bounds
from schedulers.names import public_names, resolve
from schedulers.sigmas import SCHEDULES

# The model's name in the hosted service's paths (`/v1/<slug>`, `/v2/<slug>`) and in the history.
SLUG = "stable-diffusion-3-medium-txt2img"
IMG2IMG_SLUG = "sd3-med-img2img"
MAX_SEED = 999_999_999_999_999
# Prompts are not truncated (T5 sees every token, as in ComfyUI), and attention grows with the
# square of the length: a bound keeps one request from claiming the device's memory.
MAX_PROMPT_CHARS = 4000
# What an error message echoes of the value it refuses: enough to recognise it, never the whole of a
# megabyte-long value (docs/reliability.md, Request bounds).
MAX_ECHO_CHARS = 100
MAX_MESSAGE_CHARS = 1000

# Numbers sent as strings are taken, as real clients send them, but only in plain notation: Python's
# int() and float() would also read "5_12" as 512, "٥" (an Arabic-Indic digit) as 5 and "nan" as
# a number. An int is an optional sign and ASCII digits; a float may add a decimal point and an
# exponent, the notation of JSON numbers.
_PLAIN_INT = re.compile(r"[+-]?[0-9]+")
_PLAIN_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _plain_number(value: Any, kind: type) -> Any:
    if isinstance(value, bool):
        # JSON's true is not 1: `samples: true` is a client's mistake, not a count (pydantic's lax
        # mode would read it as 1).
        raise ValueError(f"must be a number, not {str(value).lower()}")
    if not isinstance(value, str):
        return value
    if kind is int:
        pattern, what = _PLAIN_INT, "an integer (e.g. 25)"
    else:
        pattern, what = _PLAIN_FLOAT, "a number (e.g. 5.5)"
    if pattern.fullmatch(value) is None:
        raise ValueError(f"must be {what}, written as a plain number")
    return value


def plain_int(value: Any) -> Any:
    """A string that is an int in plain digits passes on to pydantic; any other string is refused."""
    return _plain_number(value, int)


# For parameters outside a body model (query strings): the same rule as the bodies' int fields.
PlainInt = Annotated[int, BeforeValidator(plain_int)]


def _number_kind(annotation: Any) -> type | None:
    """int or float when a field holds that number (possibly optional), else None; bool is not one."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = typing.get_args(annotation) if union else (annotation,)
    kinds = {arg for arg in args if arg in (int, float)}
    return kinds.pop() if len(kinds) == 1 else None


def clip_echo(value: str, limit: int = MAX_ECHO_CHARS) -> str:
    """`value` cut to `limit` characters, with an ellipsis saying it was cut."""
    return value if len(value) <= limit else value[:limit] + "…"


class LaxBody(BaseModel):
    """A request body as real clients send it: unknown fields ignored, `null` meaning the default,
    and a prompt that is more than whitespace. Shared by every generation surface."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=False)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

    @field_validator("*", mode="before")
    @classmethod
    def _plain_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name is None:
            return value
        kind = _number_kind(cls.model_fields[info.field_name].annotation)
        return value if kind is None else _plain_number(value, kind)

    @field_validator("prompt", check_fields=False)
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


class Txt2ImgRequest(LaxBody):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="Prompt to render")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="Prompts to exclude")
    samples: int = Field(1, ge=1, le=4, description="Number of samples to generate")
    scheduler: str = Field("DPM++ 2M", description="Sampler and schedule; GET /v1/schedulers lists them")
    num_inference_steps: int = Field(25, ge=10, le=100)
    guidance_scale: float = Field(5.0, ge=1, le=25)
    denoise: float = Field(1.0, ge=0.1, le=1)
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1 draws a random seed, reported in x-seed")
    img_width: int = Field(1024, ge=512, le=2048, multiple_of=8)
    img_height: int = Field(1024, ge=512, le=2048, multiple_of=8)
    modelsamplingsd3_shift: float = Field(3.0, ge=1, le=10)
    conditioningsettimesteprange_start: float = Field(0.1, ge=0.1, le=1)
    conditioningsettimesteprange_stop: float = Field(1.0, ge=0.1, le=1)
    base64: bool = False

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _usable_weights(cls, value: str) -> str:
        return usable_weights(value)

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        try:
            return resolve(value).label
        except ValueError:
            # Not UnknownScheduler's own message: it quotes the name whole, and the name may be long.
            raise ValueError(f"unknown scheduler; accepted: {', '.join(public_names())}") from None


def usable_weights(value: str) -> str:
    weight = weight_out_of_bounds(parse_weights(value))
    if weight is not None:
        raise ValueError(
            f"a prompt weight of {weight:g} is outside -{MAX_WEIGHT:g} to {MAX_WEIGHT:g} (an explicit "
            "'(text:weight)', or nested parentheses, which multiply by 1.1 per level)"
        )
    return value


class Img2ImgRequest(LaxBody):
    """`sd3-med-img2img` (docs/contract.md, img2img): the page's fields, defaults and ranges.

    `image` is checked for shape here and decoded by the serving layer (server/image_input.py), which
    knows the limits; both happen before anything is reserved. `sampler` takes any sampler name of
    schedulers/names.py (ComfyUI's tokens, the A1111 labels, the page's spellings) and keeps only its
    sampler: the schedule is `scheduler`'s.
    """

    image: str = Field(min_length=1, description="The input image: base64, a data:image URI, or a URL")
    prompt: str = Field(
        min_length=1, max_length=MAX_PROMPT_CHARS, description="Text prompt for image generation"
    )
    negative_prompt: str = Field(
        "low quality,less details", max_length=MAX_PROMPT_CHARS, description="Prompts to exclude"
    )
    num_inference_steps: int = Field(20, ge=1, le=100)
    guidance_scale: float = Field(5.0, ge=1, le=20)
    seed: int = Field(698845, ge=-1, le=MAX_SEED, description="-1 draws a random seed, reported in x-seed")
    samples: int = Field(1, ge=1, le=4, description="Number of samples to generate")
    strength: float = Field(0.7, ge=0, le=1, description="Strength of the image transformation")
    sampler: str = Field("dpmpp_2m", description="Sampler; GET /v1/schedulers lists the names")
    scheduler: str = Field("sgm_uniform", description="Sigma schedule: " + ", ".join(SCHEDULES))
    base64: bool = False

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _usable_weights(cls, value: str) -> str:
        return usable_weights(value)

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, value: str) -> str:
        try:
            return resolve(value).label
        except ValueError:
            raise ValueError(f"unknown sampler; accepted: {', '.join(public_names())}") from None

    @field_validator("scheduler")
    @classmethod
    def _known_schedule(cls, value: str) -> str:
        folded = value.casefold()
        if folded not in SCHEDULES:
            raise ValueError(f"unknown scheduler; accepted: {', '.join(SCHEDULES)}")
        return folded


def recorded_params(params: dict[str, Any]) -> dict[str, Any]:
    """A stored request body as the history shows it: an img2img image (megabytes of base64) is
    summarised, never echoed."""
    image = params.get("image")
    if isinstance(image, str) and len(image) > MAX_ECHO_CHARS:
        return {**params, "image": f"<{len(image)} characters>"}
    return params


_NO_ECHO = frozenset({"missing", "json_invalid", "model_type"})


def describe_validation_errors(errors: Sequence[Any]) -> str:
    """One readable line per problem: `field: what is wrong (got value)`."""
    lines = []
    for err in errors:
        loc = ".".join(str(part) for part in err.get("loc", ()) if part != "body") or "body"
        message = str(err.get("msg", "is invalid"))
        message = message.removeprefix("Value error, ")
        if err.get("type") == "missing":
            message = "is required"
        if err.get("type") == "json_invalid":
            loc, message = "body", f"is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})"
        got = err.get("input")
        suffix = f" (got {clip_echo(repr(got))})" if err.get("type") not in _NO_ECHO else ""
        if isinstance(got, (dict, list)):
            suffix = ""
        # Messages are ours or pydantic's and short; the clip only guards against one that quotes input.
        lines.append(f"{clip_echo(loc)}: {clip_echo(message, MAX_MESSAGE_CHARS)}{suffix}")
    return "; ".join(lines) or "invalid request"


__all__ = [
    "IMG2IMG_SLUG",
    "Img2ImgRequest",
    "MAX_SEED",
    "SLUG",
    "Txt2ImgRequest",
    "recorded_params",
    "ValidationError",
    "describe_validation_errors",
]
