"""The playground: a one-page browser UI at `GET /` for trying the server without writing code.

Plain HTML, JS and CSS from `server/static/` — no build step and nothing fetched from elsewhere,
so the page works offline and behind firewalls, and the Content-Security-Policy below makes the
browser refuse any external load (a CDN script, font or image) should one ever creep in. The page
calls the public API like any other client (`POST /v1/<slug>` with the user's key), so beyond its
files it needs only `GET /playground/models.json`: which slugs this server answers (the loaded
family's, docs/contract.md §9) and, for each form control, the body field it fills there with that
field's default and range, read from the body models themselves.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from pipelines.options import Family
from schedulers.names import public_names
from schedulers.sigmas import SCHEDULES
from server.api.deps import ServingDep
from server.api.renderers import SegmindRoute
from server.errors import NotFound
from server.schemas import IMG2IMG_SLUG, SD35_REQUESTS, SERVED_SLUGS, Img2ImgRequest, Txt2ImgRequest

router = APIRouter(route_class=SegmindRoute)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# The only files served, by name: nothing is looked up from the URL in the file system.
ASSETS = {
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        # Generated images arrive as base64 and are shown as data: URLs.
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The files ship with the package: revalidating them costs nothing and a new release shows at once.
    "Cache-Control": "no-cache",
}


TITLES: dict[Family, str] = {
    "sd3-medium": "Stable Diffusion 3 Medium",
    "sd3.5-large": "Stable Diffusion 3.5 Large",
    "sd3.5-large-turbo": "Stable Diffusion 3.5 Large Turbo",
    "sd3.5-medium": "Stable Diffusion 3.5 Medium",
}
# The page's form controls (element ids) → the body field each fills, per slug: one form drives every
# slug, each in its own names (docs/contract.md §1, §7, §8). `scheduler` is the sampler list: SD3
# txt2img's one name for sampler and schedule, elsewhere `sampler`; `schedule` is the schedule's.
SD3_TXT2IMG_CONTROLS = {
    "negative-prompt": "negative_prompt",
    "scheduler": "scheduler",
    "steps": "num_inference_steps",
    "guidance": "guidance_scale",
    "seed": "seed",
    "width": "img_width",
    "height": "img_height",
    "samples": "samples",
}
IMG2IMG_CONTROLS = {
    "negative-prompt": "negative_prompt",
    "scheduler": "sampler",
    "schedule": "scheduler",
    "strength": "strength",
    "steps": "num_inference_steps",
    "guidance": "guidance_scale",
    "seed": "seed",
    "samples": "samples",
}
SD35_CONTROLS = {
    "negative-prompt": "negative_prompt",
    "scheduler": "sampler",
    "schedule": "scheduler",
    "steps": "steps",
    "guidance": "guidance_scale",
    "seed": "seed",
    "width": "width",
    "height": "height",
    "samples": "batch_size",
}
_SCHEMA_KEYS = ("default", "minimum", "maximum", "multipleOf")


def _mode(slug: str, model: type[BaseModel], controls: dict[str, str]) -> dict[str, Any]:
    """How the page calls `slug`: its path, and per control the field, default and range."""
    properties = model.model_json_schema()["properties"]
    fields: dict[str, dict[str, Any]] = {}
    for control, name in controls.items():
        spec = properties[name]
        fields[control] = {"name": name} | {key: spec[key] for key in _SCHEMA_KEYS if key in spec}
    # Names are checked by validators, not the schema: the lists come from where those look.
    fields["scheduler"]["accepted"] = public_names()
    if "schedule" in fields:
        fields["schedule"]["accepted"] = list(SCHEDULES)
    return {"slug": slug, "path": f"/v1/{slug}", "fields": fields}


@cache
def page_models(family: Family) -> dict[str, Any]:
    """What the page reads at load: the family, its txt2img slug and, if served, img2img."""
    slugs = SERVED_SLUGS[family]
    txt2img = slugs[0]  # each family's txt2img slug comes first
    sd35 = SD35_REQUESTS.get(txt2img)
    return {
        "family": family,
        "title": TITLES[family],
        "txt2img": _mode(txt2img, sd35, SD35_CONTROLS)
        if sd35 is not None
        else _mode(txt2img, Txt2ImgRequest, SD3_TXT2IMG_CONTROLS),
        "img2img": _mode(IMG2IMG_SLUG, Img2ImgRequest, IMG2IMG_CONTROLS) if IMG2IMG_SLUG in slugs else None,
    }


@cache
def _file(name: str) -> bytes:
    return (STATIC_DIR / name).read_bytes()


@router.get("/", include_in_schema=False)
async def playground() -> Response:
    return Response(_file("playground.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


# Before the asset route, which would take "models.json" for a file name.
@router.get("/playground/models.json", include_in_schema=False)
async def models(serving: ServingDep) -> JSONResponse:
    return JSONResponse(page_models(serving.family), headers=HEADERS)


@router.get("/playground/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFound()
    return Response(_file(name), media_type=media_type, headers=HEADERS)
