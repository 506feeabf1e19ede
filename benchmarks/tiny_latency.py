"""How long the original request takes on the tiny model, end to end, beside plain diffusers.

    python benchmarks/tiny_latency.py [--repeats 3] [--data-dir DIR]

Runs the request of the hosted model page (1024x1024, 25 steps, CFG 5, DPM++ 2M) three ways,
interleaved so that the machine's noise hits all of them alike:
  1. over HTTP: POST /v1/stable-diffusion-3-medium-txt2img on a real uvicorn (JPEG bytes back);
  2. our generator alone (encode + ComfyUI-math loop + VAE decode);
  3. the stock diffusers StableDiffusion3Pipeline, same size/steps/CFG (its own Euler scheduler).
It prints the median of each and the ratios. The tiny model's timings say nothing about real SD3
speed (see docs/performance.md §9); they show that the whole path runs in seconds on a small CPU. On the
tiny model's near character-level tokenizers the page's prompt is 235 context tokens, which does
not stack with the 154-token negative, so "our generator / stock" compares 50 forwards of 1 row
with 25 of 2: server_overhead.py --prompts real-length compares equal work.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn

from server.app import create_app
from server.config import Settings
from server.ledger import Ledger
from server.runtime import load_runtime

# The hosted page's example body (a JSON object, so its values are of mixed types).
ORIGINAL: dict[str, Any] = {
    "prompt": "A whimsical and high-resolution highly realistic image of a panda in a vintage cosmonaut"
    " suit.",
    "negative_prompt": "bad quality, poor quality, doll, disfigured, jpg, toy, bad anatomy, missing limbs",
    "samples": 1,
    "scheduler": "DPM++ 2M",
    "num_inference_steps": 25,
    "guidance_scale": 5,
    "denoise": 1,
    "seed": 468685,
    "img_width": 1024,
    "img_height": 1024,
    "modelsamplingsd3_shift": 3,
    "conditioningsettimesteprange_start": 0.1,
    "conditioningsettimesteprange_stop": 1,
    "base64": False,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="sd3-bench-"))
    settings = Settings(data_dir=data_dir, model={"id": "tiny"})

    started = time.perf_counter()
    runtime = load_runtime(settings)
    print(
        f"tiny model built/loaded in {time.perf_counter() - started:.2f} s"
        f" ({torch.get_num_threads()} threads)"
    )

    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, runtime), host="127.0.0.1", port=0, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1/stable-diffusion-3-medium-txt2img"
    _, key = Ledger(settings.resolved_database_url).create_key(
        name=f"bench-{time.time_ns()}", credits=Decimal(100)
    )

    from pipelines.sd3 import SD3Generator
    from server.schemas import Txt2ImgRequest
    from server.serving import to_generation_request

    generator = runtime.generator
    assert isinstance(generator, SD3Generator)
    job = to_generation_request(Txt2ImgRequest.model_validate(ORIGINAL), seed=ORIGINAL["seed"])
    pipe = generator.pipe

    def http() -> None:
        response = httpx.post(url, json=ORIGINAL, headers={"x-api-key": key}, timeout=300)
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg", response.text

    def ours() -> None:
        generator.generate(job)

    def stock() -> None:
        with torch.inference_mode():
            pipe(
                ORIGINAL["prompt"],
                negative_prompt=ORIGINAL["negative_prompt"],
                height=1024,
                width=1024,
                num_inference_steps=25,
                guidance_scale=5.0,
                max_sequence_length=77,
                generator=torch.Generator().manual_seed(ORIGINAL["seed"]),
                output_type="np",
            )

    runs: dict[str, list[float]] = {"HTTP end to end": [], "our generator": [], "stock diffusers": []}
    contenders = list(zip(runs.values(), (http, ours, stock), strict=True))
    for _, fn in contenders:  # warm-up: first-call allocations and lazy imports
        fn()
    for _ in range(args.repeats):
        for times, fn in contenders:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)

    print(f"original request: 1024x1024, 25 steps, CFG 5, DPM++ 2M; median of {args.repeats}")
    medians = {name: statistics.median(times) for name, times in runs.items()}
    for name, seconds in medians.items():
        print(f"  {name:<18} {seconds:6.2f} s")
    ours_s, stock_s, http_s = medians["our generator"], medians["stock diffusers"], medians["HTTP end to end"]
    print(f"  ratio our generator / stock diffusers: {ours_s / stock_s:.2f}")
    print(f"  ratio HTTP / our generator (server overhead): {http_s / ours_s:.2f}")
    server.should_exit = True
    thread.join(timeout=10)


if __name__ == "__main__":
    main()
