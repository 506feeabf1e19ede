"""Wire models: the request body of the txt2img endpoint exactly as api-contract.md §1 gives it.

Validation happens here, at the edge, before anything is priced, reserved or queued, and every
message names the field and the rule. Real clients send numbers and booleans as strings, so the
model is lax (pydantic's default): "25" is 25 and "False" is false; `null` means the default;
unknown fields are ignored, because clients send fields of other models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schedulers.names import UnknownScheduler, resolve

MAX_SEED = 999_999_999_999_999
# Prompts are not truncated (T5 sees every token, as in ComfyUI), and attention grows with the
# square of the length: a bound keeps one request from claiming the device's memory.
MAX_PROMPT_CHARS = 4000


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

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        try:
            return resolve(value).label
        except UnknownScheduler as exc:
            raise ValueError(str(exc)) from None


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
        suffix = f" (got {got!r})" if err.get("type") not in {"missing", "json_invalid", "model_type"} else ""
        if isinstance(got, (dict, list)):
            suffix = ""
        lines.append(f"{loc}: {message}{suffix}")
    return "; ".join(lines) or "invalid request"


def parse_txt2img(body: bytes) -> Txt2ImgRequest:
    """Parse and validate a JSON body, raising `ValidationError` (mapped to 422 by the caller)."""
    return Txt2ImgRequest.model_validate_json(body or b"null")


__all__ = ["MAX_SEED", "Txt2ImgRequest", "ValidationError", "describe_validation_errors", "parse_txt2img"]
