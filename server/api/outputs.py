"""`GET /v1/outputs/<id>.jpg` (`.png`, `.webp`): the images behind the URLs of the OpenAI surface and v2 jobs.

No API key is asked for: an output URL is a capability URL, like the hosted service's signed
output URLs — the 128-bit random id is the secret (server/outputs.py), so the URL can be handed
to an <img> tag, a browser or another service as it is.
"""

from __future__ import annotations

from anyio import to_thread
from fastapi import APIRouter, Request, Response

from server.api.renderers import SegmindRoute
from server.errors import NotFound
from server.outputs import OutputStore

router = APIRouter(route_class=SegmindRoute)


_MEDIA_TYPES = {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}


def _read(store: OutputStore, output_id: str, suffix: str) -> bytes | None:
    path = store.path(output_id, suffix)
    if path is None:
        return None
    try:
        # Read whole (a JPEG is at most a few MB) rather than streamed: a purge between the check and
        # the read then gives a clean 404 instead of a response that fails half-way.
        return path.read_bytes()
    except FileNotFoundError:
        return None


@router.get("/v1/outputs/{output_id}.jpg", response_class=Response)
async def output(request: Request, output_id: str) -> Response:
    return await _serve(request, output_id, ".jpg")


@router.get("/v1/outputs/{output_id}.png", response_class=Response)
async def png_output(request: Request, output_id: str) -> Response:
    return await _serve(request, output_id, ".png")


@router.get("/v1/outputs/{output_id}.webp", response_class=Response)
async def webp_output(request: Request, output_id: str) -> Response:
    return await _serve(request, output_id, ".webp")


async def _serve(request: Request, output_id: str, suffix: str) -> Response:
    store: OutputStore = request.app.state.outputs
    data = await to_thread.run_sync(_read, store, output_id, suffix)
    if data is None:
        raise NotFound(f"No output {output_id} (outputs are kept {store.retention_s} seconds)")
    return Response(
        data,
        media_type=_MEDIA_TYPES[suffix],
        headers={
            # An id never names another image, so caches may keep it; "private" because the URL is
            # a secret that shared caches should not hold on to. A URL must not leak through the
            # Referer header of links followed from wherever the image is shown.
            "Cache-Control": f"private, max-age={store.retention_s}, immutable",
            "Referrer-Policy": "no-referrer",
        },
    )
