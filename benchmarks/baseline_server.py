"""The baseline: a plain FastAPI + StableDiffusion3Pipeline server, written the obvious way.

    python benchmarks/baseline_server.py --model-dir DIR [--port 8001] [--host 127.0.0.1]

What a user would write in an afternoon, kept deliberately naive so that sd3-server has something
honest to be compared with: one POST endpoint taking the Segmind fields that matter (prompt,
negative_prompt, num_inference_steps (or steps), guidance_scale, seed, img_width, img_height), a
*sync* handler that FastAPI runs in its threadpool, `pipe(...)` with diffusers' own scheduler
(FlowMatchEuler), `max_sequence_length=77` (the same T5 token count as ours, so the transformer does
the same work), the PIL image encoded to JPEG by Pillow, `image/jpeg` back. No auth, no credits, no
queue. Like most such servers it shares one pipeline between threads with no lock, which is unsafe
under concurrent requests (the scheduler's state is per pipeline; diffusers #3672): the benchmarks
only send it one request at a time.

Importable: `create_baseline_app(pipe)` builds the app, `load_baseline_pipeline(dir)` loads the
pipeline, and `serve_in_thread(app)` runs any ASGI app on a loopback uvicorn thread (the other
benchmark scripts use it for both servers, so both run under the same conditions).
"""

from __future__ import annotations

import argparse
import io
import threading
import time
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Response
from pydantic import AliasChoices, BaseModel, Field

SLUG = "stable-diffusion-3-medium-txt2img"
# Pillow's default is 75; ours encodes at 90, so the baseline does too (same bytes to move).
JPEG_QUALITY = 90


class BaselineRequest(BaseModel):
    # Unknown fields (scheduler, shift, …) are ignored, so the body sent to sd3-server works as is.
    prompt: str
    negative_prompt: str = ""
    num_inference_steps: int = Field(25, validation_alias=AliasChoices("num_inference_steps", "steps"))
    guidance_scale: float = 5.0
    seed: int = -1
    img_width: int = 1024
    img_height: int = 1024


def load_baseline_pipeline(
    model_dir: Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> Any:
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, dtype=dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def create_baseline_app(pipe: Any) -> FastAPI:
    app = FastAPI(title="baseline SD3 server")

    @app.post(f"/v1/{SLUG}")
    def txt2img(body: BaselineRequest) -> Response:  # sync def: FastAPI runs it in its threadpool
        seed = body.seed if body.seed >= 0 else int(torch.randint(0, 2**31 - 1, ()).item())
        image = pipe(
            prompt=body.prompt,
            negative_prompt=body.negative_prompt,
            num_inference_steps=body.num_inference_steps,
            guidance_scale=body.guidance_scale,
            width=body.img_width,
            height=body.img_height,
            max_sequence_length=77,
            generator=torch.Generator(device=pipe.device).manual_seed(seed),
        ).images[0]
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        return Response(buffer.getvalue(), media_type="image/jpeg", headers={"x-seed": str(seed)})

    return app


def serve_in_thread(app: Any, *, host: str = "127.0.0.1") -> tuple[uvicorn.Server, threading.Thread, str]:
    """Start uvicorn on a free port in a daemon thread; return it, the thread and the base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://{host}:{port}"


def stop_server(server: uvicorn.Server, thread: threading.Thread) -> None:
    server.should_exit = True
    thread.join(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="a diffusers SD3 folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    # fp16 on a GPU as such servers are usually run; fp32 on a CPU (fp16 there is slow and lossy).
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    pipe = load_baseline_pipeline(args.model_dir, device=args.device, dtype=dtype)
    uvicorn.run(create_baseline_app(pipe), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
