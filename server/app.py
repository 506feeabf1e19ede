"""`create_app(settings, runtime)`: the FastAPI application, wired once.

The model is loaded *before* the app is created (`load_runtime`), so that a missing or gated
model fails the `serve` command with one sentence before any port is bound, and tests can build
the tiny model once and share it between apps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from anyio import to_thread
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from pipelines.compilation import speed_up, warm_up
from pipelines.loading import ModelSpec, load_model
from pipelines.sd3 import SamplingOptions, SD3Generator, batch_key
from server.api import ops, segmind
from server.body_limit import BodySizeLimit
from server.config import Settings
from server.errors import install_error_handlers
from server.ledger import Ledger
from server.queue import BatchGenerator, WorkQueue
from server.serving import Serving


@dataclass(frozen=True)
class Runtime:
    generator: BatchGenerator
    description: str
    device: str


def model_spec(settings: Settings) -> ModelSpec:
    model = settings.model
    return ModelSpec(
        source=model.id,
        tiny_dir=settings.tiny_model_dir,
        revision=model.revision,
        config=model.config,
        device=model.device,
        dtype=model.dtype,
        token=model.hf_token.get_secret_value() if model.hf_token else None,
        load_t5=model.t5,
    )


def load_runtime(settings: Settings) -> Runtime:
    """Load the model the settings name (raises `ModelLoadError` with a one-sentence reason)."""
    loaded = load_model(model_spec(settings))
    sampling = settings.sampling
    generator = SD3Generator(
        loaded,
        SamplingOptions(
            negative_window_wiring=sampling.negative_window_wiring,
            percent_rule=sampling.percent_rule,
            max_sequence_length=sampling.max_sequence_length,
            prompt_cache_bytes=settings.memory.prompt_cache_mb * 2**20,
        ),
    )
    perf = settings.performance
    speed_up(
        loaded.pipe,
        compile=perf.compile,
        mode=perf.compile_mode,
        backend=perf.compile_backend,
        fuse_qkv=perf.fuse_qkv,
    )
    if perf.warmup if perf.warmup is not None else perf.compile:
        warm_up(generator, size=perf.warmup_size)
    return Runtime(generator=generator, description=loaded.description, device=str(loaded.device))


def create_app(settings: Settings, runtime: Runtime) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ledger = Ledger(settings.resolved_database_url)
        queue = WorkQueue(
            runtime.generator,
            batch_key=batch_key,
            max_pending=settings.queue.max_pending,
            retry_after_s=settings.queue.retry_after_s,
            max_batch_images=settings.queue.max_batch_images,
        )
        serving = Serving(settings=settings, ledger=ledger, queue=queue)
        # Before the first request: nothing of this instance can be in flight yet.
        await to_thread.run_sync(serving.recover)
        app.state.serving = serving
        app.state.model_description = runtime.description
        app.state.device = runtime.device
        try:
            yield
        finally:
            queue.shutdown()
            ledger.close()

    app = FastAPI(
        title="sd3-server",
        summary="Segmind's Stable Diffusion 3 Medium txt2img API, on your own hardware",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.limits.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["x-api-key", "authorization", "content-type"],
            expose_headers=[
                "x-remaining-credits",
                "x-cost",
                "x-seed",
                "x-seed-value",
                "x-request-id",
                "x-generation-time",
                "x-rate-limit-remaining",
                "x-rate-limit-reset-at-utc",
            ],
        )
    app.include_router(segmind.router)
    app.include_router(ops.router)
    return app
