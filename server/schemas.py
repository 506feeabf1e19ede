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
from typing import Annotated, Any, ClassVar

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

from pipelines.options import Family, StepCacheLevel
from pipelines.text import MAX_WEIGHT, parse_weights, weight_out_of_bounds
from schedulers.names import public_names, resolve
from schedulers.sigmas import SCHEDULES

# The model's name in the hosted service's paths (`/v1/<slug>`, `/v2/<slug>`) and in the history.
SLUG = "stable-diffusion-3-medium-txt2img"
IMG2IMG_SLUG = "sd3-med-img2img"
SD35_LARGE_SLUG = "stable-diffusion-3.5-large-txt2img"
SD35_TURBO_SLUG = "stable-diffusion-3.5-turbo-txt2img"
# Not a hosted slug: the hosted service has no SD3.5 Medium page, so ours follows the 3.5 naming.
SD35_MEDIUM_SLUG = "stable-diffusion-3.5-medium-txt2img"
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


CACHE_HELP = "Step cache, ours (off, fast, faster): faster, not exact; unset: the server's default"


class LaxBody(BaseModel):
    """A request body as real clients send it: unknown fields ignored, `null` meaning the default,
    and a prompt that is more than whitespace. Shared by every generation surface."""

    # A NaN or an infinity fails every range check, but its message should say what is wrong with
    # it ("a finite number"), not quote a bound it was never compared to.
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=False, allow_inf_nan=False)

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
    # Ours, not the hosted service's (which ignores unknown fields): the opt-in step cache
    # (pipelines/step_cache.py), which trades exactness for speed; unset: the server's default.
    cache: StepCacheLevel | None = Field(None, description=CACHE_HELP)
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


class SeparateNamesBody(LaxBody):
    """The checks of a body that names its sampler (`sampler`, any name of schedulers/names.py, of
    which only the sampler is kept) apart from its sigma schedule (`scheduler`): img2img and SD3.5."""

    @field_validator("prompt", "negative_prompt", check_fields=False)
    @classmethod
    def _usable_weights(cls, value: str) -> str:
        return usable_weights(value)

    @field_validator("sampler", check_fields=False)
    @classmethod
    def _known_sampler(cls, value: str) -> str:
        try:
            return resolve(value).label
        except ValueError:
            raise ValueError(f"unknown sampler; accepted: {', '.join(public_names())}") from None

    @field_validator("scheduler", check_fields=False)
    @classmethod
    def _known_schedule(cls, value: str) -> str:
        folded = value.casefold()
        if folded not in SCHEDULES:
            raise ValueError(f"unknown scheduler; accepted: {', '.join(SCHEDULES)}")
        return folded


class Img2ImgRequest(SeparateNamesBody):
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
    # Ours, not the hosted service's (which ignores unknown fields): the opt-in step cache
    # (pipelines/step_cache.py), which trades exactness for speed; unset: the server's default.
    cache: StepCacheLevel | None = Field(None, description=CACHE_HELP)
    base64: bool = False


# The hosted SD3.5 pages' size presets (the Comfyroll "CR SDXL Aspect Ratio" labels), each also
# accepted by its leading ratio, plus three ratios clients send that the presets lack.
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1 square 1024x1024": (1024, 1024),
    "3:4 portrait 896x1152": (896, 1152),
    "5:8 portrait 832x1216": (832, 1216),
    "9:16 portrait 768x1344": (768, 1344),
    "9:21 portrait 640x1536": (640, 1536),
    "4:3 landscape 1152x896": (1152, 896),
    "3:2 landscape 1216x832": (1216, 832),
    "16:9 landscape 1344x768": (1344, 768),
    "21:9 landscape 1536x640": (1536, 640),
}
_RATIO_SIZES: dict[str, tuple[int, int]] = {
    **{label.split(" ", 1)[0]: size for label, size in ASPECT_RATIOS.items()},
    "2:3": (832, 1216),
    "4:5": (896, 1120),
    "5:4": (1120, 896),
}
CUSTOM_ASPECT = "custom"
# `image_format` → the Content-Type it answers with.
IMAGE_FORMATS: dict[str, str] = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
_FORMAT_SPELLINGS = {"jpg": "jpeg"}


def _floor_to_8(value: int) -> int:
    # The latent is size // 8, as the pages' ComfyUI graph computes it: 1023 makes a 1016 px image.
    return value - value % 8


class SD35Request(SeparateNamesBody):
    """The hosted SD3.5 txt2img pages' body (docs/contract.md §8); each slug's subclass sets the
    defaults and ranges of `steps` and `guidance_scale`.

    `sampler` and `scheduler`, which the pages mark required, are optional (the pages' defaults);
    `aspect_ratio` other than "custom" overrides `width`/`height` (`size`).
    """

    slug: ClassVar[str]

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="Prompt to render")
    negative_prompt: str = Field(
        "low quality, blurry", max_length=MAX_PROMPT_CHARS, description="Prompts to exclude"
    )
    steps: int
    guidance_scale: float
    seed: int = Field(
        98552302, ge=-1, le=MAX_SEED, description="-1 draws a random seed, reported in x-seed-value"
    )
    sampler: str = Field("euler", description="Sampler; GET /v1/schedulers lists the names")
    scheduler: str = Field("sgm_uniform", description="Sigma schedule: " + ", ".join(SCHEDULES))
    width: int = Field(1024, ge=64, le=2048, description="Width of the output image in pixels")
    height: int = Field(1024, ge=64, le=2048, description="Height of the output image in pixels")
    aspect_ratio: str = Field(
        CUSTOM_ASPECT,
        description='"custom" (width and height), a preset ("16:9 landscape 1344x768") or its ratio ("16:9")',
    )
    batch_size: int = Field(1, ge=1, le=4, description="Number of images to generate")
    image_format: str = Field("jpeg", description="jpeg (or jpg), png or webp")
    image_quality: int = Field(95, ge=1, le=100, description="JPEG and WebP quality; ignored for png")
    # Ours, not the hosted service's (which ignores unknown fields): the opt-in step cache
    # (pipelines/step_cache.py), which trades exactness for speed; unset: the server's default.
    cache: StepCacheLevel | None = Field(None, description=CACHE_HELP)
    base64: bool = False

    @field_validator("width", "height")
    @classmethod
    def _on_the_latent_grid(cls, value: int) -> int:
        return _floor_to_8(value)

    @field_validator("aspect_ratio")
    @classmethod
    def _known_aspect_ratio(cls, value: str) -> str:
        folded = " ".join(value.split()).casefold()
        if folded != CUSTOM_ASPECT and folded not in ASPECT_RATIOS and folded not in _RATIO_SIZES:
            accepted = [CUSTOM_ASPECT, *ASPECT_RATIOS, *_RATIO_SIZES]
            raise ValueError(f"unknown aspect ratio; accepted: {', '.join(accepted)}")
        return folded

    @field_validator("image_format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        folded = value.casefold()
        folded = _FORMAT_SPELLINGS.get(folded, folded)
        if folded not in IMAGE_FORMATS:
            raise ValueError("unknown image format; accepted: jpeg, jpg, png, webp")
        return folded

    @property
    def size(self) -> tuple[int, int]:
        """The output's (width, height): the preset's, or the fields' for "custom"."""
        if self.aspect_ratio == CUSTOM_ASPECT:
            return self.width, self.height
        return ASPECT_RATIOS.get(self.aspect_ratio) or _RATIO_SIZES[self.aspect_ratio]


class SD35LargeRequest(SD35Request):
    slug: ClassVar[str] = SD35_LARGE_SLUG
    steps: int = Field(30, ge=10, le=70, description="Number of denoising steps")
    guidance_scale: float = Field(5.5, ge=1, le=15)


class SD35TurboRequest(SD35Request):
    slug: ClassVar[str] = SD35_TURBO_SLUG
    # The page's 10-70 would refuse its own default of 4 (docs/contract.md §8).
    steps: int = Field(4, ge=1, le=70, description="Number of denoising steps")
    guidance_scale: float = Field(1.0, ge=1, le=15)


class SD35MediumRequest(SD35Request):
    """Ours: no hosted page; the §8 contract with the model card's steps and guidance."""

    slug: ClassVar[str] = SD35_MEDIUM_SLUG
    steps: int = Field(40, ge=10, le=70, description="Number of denoising steps")
    guidance_scale: float = Field(4.5, ge=1, le=15)


SD35_REQUESTS: dict[str, type[SD35Request]] = {
    model.slug: model for model in (SD35LargeRequest, SD35TurboRequest, SD35MediumRequest)
}

# Which slugs the loaded weights answer (docs/contract.md §9): an SD3 Medium server is not an
# SD3.5 one, and its answers would not be the hosted model's. Each family's txt2img slug comes first.
SERVED_SLUGS: dict[Family, tuple[str, ...]] = {
    "sd3-medium": (SLUG, IMG2IMG_SLUG),
    "sd3.5-large": (SD35_LARGE_SLUG,),
    "sd3.5-large-turbo": (SD35_TURBO_SLUG,),
    "sd3.5-medium": (SD35_MEDIUM_SLUG,),
}
_NO_CONTROLNET = "it runs SD3 Medium with a ControlNet, which this server does not load"
_STABILITY_HOSTED = "it is Stability AI's hosted model, whose weights were never released"
# The other slugs of the hosted SD3 family, which no weights here serve, and why.
UNSERVED_SLUGS: dict[str, str] = {
    "sd3-med-canny": _NO_CONTROLNET,
    "sd3-med-pose": _NO_CONTROLNET,
    "sd3-med-tile": _NO_CONTROLNET,
    "stable-diffusion-3-large-txt2img": _STABILITY_HOSTED,
    "stable-diffusion-3-large-img2img": _STABILITY_HOSTED,
    "stable-diffusion-3-turbo-img2img": _STABILITY_HOSTED,
}


def not_served_message(slug: str, *, family: Family, model_id: str) -> str:
    """The 404 of a family slug the loaded weights do not serve (docs/contract.md §9)."""
    message = (
        f"'{slug}' is not served here: this server runs {family} ({model_id}); "
        f"served: {', '.join(SERVED_SLUGS[family])}"
    )
    reason = UNSERVED_SLUGS.get(slug)
    return message if reason is None else f"{message} ({reason})"


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
    "IMAGE_FORMATS",
    "Img2ImgRequest",
    "MAX_SEED",
    "SD35_LARGE_SLUG",
    "SD35_MEDIUM_SLUG",
    "SD35_REQUESTS",
    "SD35_TURBO_SLUG",
    "SD35LargeRequest",
    "SD35MediumRequest",
    "SD35Request",
    "SD35TurboRequest",
    "SERVED_SLUGS",
    "SLUG",
    "UNSERVED_SLUGS",
    "not_served_message",
    "Txt2ImgRequest",
    "recorded_params",
    "ValidationError",
    "describe_validation_errors",
]
