"""`create_app(settings, runtime)`: the FastAPI application, wired once.

The model is loaded *before* the app is created (`load_runtime`), so that a missing or gated
model fails the `serve` command with one sentence before any port is bound, and tests can build
the tiny model once and share it between apps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from pipelines.attention import activate as activate_attention
from pipelines.attention import choose as choose_attention
from pipelines.compilation import (
    compile_transformer,
    compile_vae_decoder,
    fuse_qkv,
    keep_compiled_code_in,
    on_by_default,
    warm_up,
)
from pipelines.families import expected_family
from pipelines.loading import ModelLoadError, ModelSpec, load_model, resolve_device
from pipelines.lora import LoraError, LoraSpec, fuse_loras
from pipelines.memory import MemoryPlan, apply_plan, free_memory, plan_memory
from pipelines.options import Family
from pipelines.sd3 import SamplingOptions, SD3Generator, batch_key
from pipelines.transformer_quantization import quantization_problem, quantize_transformer
from server.api import admin, ops, playground, segmind
from server.api import jobs as jobs_api
from server.api import openai as openai_api
from server.api import outputs as outputs_api
from server.api.renderers import install_error_handlers
from server.body_limit import BodySizeLimit
from server.config import Settings
from server.db.migrations import upgrade_to_head
from server.instance import adopt_legacy_rows
from server.job_store import JobStore
from server.ledger import Ledger
from server.logs import RequestContext
from server.metrics import Metrics, RequestMetrics
from server.outputs import OutputStore
from server.queue import BatchGenerator, WorkQueue
from server.schemas import SERVED_SLUGS
from server.serving import Serving


@dataclass(frozen=True)
class Runtime:
    generator: BatchGenerator
    description: str
    device: str
    family: Family = "sd3-medium"  # which slugs it can serve (pipelines/families.py)


def model_spec(settings: Settings, plan: MemoryPlan) -> ModelSpec:
    model = settings.model
    return ModelSpec(
        source=model.id,
        tiny_dir=settings.tiny_model_dir,
        revision=model.revision,
        config=model.config,
        device=model.device,
        dtype=model.dtype,
        token=model.hf_token.get_secret_value() if model.hf_token else None,
        load_t5=plan.t5 != "off",
        t5_8bit=plan.t5 == "8bit",
        place_on_device=plan.placement == "device" and not plan.t5_on_cpu,
        t5_on_cpu=plan.t5_on_cpu,
        family=model.family,
    )


def memory_plan(settings: Settings) -> MemoryPlan:
    memory = settings.memory
    device = resolve_device(settings.model.device)
    try:
        return plan_memory(
            mode=memory.mode,
            device=device,
            free_bytes=free_memory(device),
            t5=memory.t5,
            t5_on_cpu=memory.t5_on_cpu,
            vae_tiling=memory.vae_tiling,
            attention_slicing=memory.attention_slicing,
            family=expected_family(settings.model.id, settings.model.family),
        )
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc


def load_runtime(settings: Settings) -> Runtime:
    """Load the model the settings name (raises `ModelLoadError` with a one-sentence reason)."""
    plan = memory_plan(settings)
    perf = settings.performance
    device = resolve_device(settings.model.device)
    problem = quantization_problem(perf.quantize, device=device, placement=plan.placement)
    kernel, unavailable = choose_attention(perf.attention, device)
    for reason in (problem, unavailable):
        if reason is not None:  # before minutes of loading
            raise ModelLoadError(reason)
    try:
        loras = [LoraSpec.parse(text) for text in settings.model.lora]  # a typo, also before loading
        loaded = load_model(model_spec(settings, plan))
        fused = fuse_loras(loaded.pipe, loras)  # before fused QKV and quantization replace their layers
    except LoraError as exc:
        raise ModelLoadError(str(exc)) from exc
    resident = plan.placement == "device"
    if on_by_default(perf.fuse_qkv, device=loaded.device, resident=resident):
        fuse_qkv(loaded.pipe.transformer)
    # Before the offload hooks and compilation, which must see the quantized layers.
    quantized = quantize_transformer(loaded.pipe.transformer, perf.quantize)
    apply_plan(loaded.pipe, plan, loaded.device)
    activate_attention(kernel)
    sampling = settings.sampling
    generator = SD3Generator(
        loaded,
        SamplingOptions(
            negative_window_wiring=sampling.negative_window_wiring,
            percent_rule=sampling.percent_rule,
            max_sequence_length=sampling.max_sequence_length,
            prompt_cache_bytes=settings.memory.prompt_cache_mb * 2**20,
        ),
        t5_on_cpu=plan.t5_on_cpu,
    )
    compile = on_by_default(perf.compile, device=loaded.device, resident=resident)
    if compile:
        keep_compiled_code_in(settings.data_dir / "inductor-cache")
        compile_transformer(
            loaded.pipe, scope=perf.compile_scope, mode=perf.compile_mode, backend=perf.compile_backend
        )
        compile_vae_decoder(loaded.pipe, mode=perf.compile_mode, backend=perf.compile_backend)
    if perf.warmup if perf.warmup is not None else compile:
        warm_up(generator, sizes=perf.warmup_shapes)
    precision = str(loaded.dtype).removeprefix("torch.")  # bfloat16 on a CPU with native bf16 (auto)
    return Runtime(
        generator=generator,
        description=f"{loaded.description}; {precision}; memory: {plan.describe()}"
        + (f"; LoRA: {', '.join(fused)}" if fused else "")
        + (f"; transformer in {perf.quantize} ({quantized} layers)" if quantized else "")
        + (f"; attention: {kernel}" if kernel != "sdpa" else ""),
        device=str(loaded.device),
        family=loaded.family,
    )


def create_app(settings: Settings, runtime: Runtime) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The process's start-up, before any repository is built (server/db/migrations): a no-op read
        # when `serve` or a Ray replica has upgraded already, as for its starter key or its dead peers.
        upgrade_to_head(settings.resolved_database_url)
        ledger = Ledger(settings.resolved_database_url)
        queue = WorkQueue(
            runtime.generator,
            batch_key=batch_key,
            max_pending=settings.queue.max_pending,
            retry_after_s=settings.queue.retry_after_s,
            max_batch_images=settings.queue.max_batch_images,
            max_batch_pixels=settings.queue.max_batch_pixels,
            batch_wait_s=settings.queue.batch_wait_ms / 1000,
        )
        outputs = OutputStore(settings.data_dir / "outputs", retention_s=settings.jobs.outputs_retention_s)
        app.state.outputs = outputs
        jobs = JobStore(ledger.engine)
        serving = Serving(
            settings=settings,
            ledger=ledger,
            queue=queue,
            jobs=jobs,
            outputs=outputs,
            metrics=metrics,
            family=runtime.family,
        )
        # Before the first request: nothing of this instance can be in flight yet. Rows of this data
        # folder's previous, port-based identity become ours first (server/instance.py says when).
        adopt_legacy_rows(settings, ledger.engine, owner=serving.owner)
        await serving.recover()
        app.state.serving = serving
        app.state.model_description = runtime.description
        app.state.device = runtime.device
        app.state.family = runtime.family
        # Expired outputs stop being served at once; this frees their disk space.
        purger = asyncio.create_task(outputs.purge_forever(), name="purge-outputs")
        try:
            yield
        finally:
            purger.cancel()
            await serving.shutdown()  # stops the queue too, once the v2 jobs are put back
            ledger.close()

    # The docs pages load their scripts from the server itself: a self-hosted server often has no internet.
    app = FastAPIOffline(
        title="sd3-server",
        summary="Segmind's Stable Diffusion 3 Medium txt2img API, on your own hardware",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    metrics = Metrics()
    app.state.metrics = metrics
    # Added innermost first: the request id wraps everything, so even a 413 carries it.
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.limits.max_body_bytes,
        image_max_bytes=settings.limits.image_max_bytes,
    )
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
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(RequestContext)
    app.include_router(segmind.router)
    app.include_router(jobs_api.router)
    app.include_router(ops.router)
    # Without an admin token the admin routes answer 404, so the schema must not advertise them either.
    app.include_router(admin.router, include_in_schema=settings.admin_token is not None)
    app.include_router(openai_api.router)
    app.include_router(outputs_api.router)
    app.include_router(playground.router)
    document_served_slugs_only(app, runtime.family)
    return app


def document_served_slugs_only(app: FastAPI, family: Family) -> None:
    """Leave out of `/openapi.json` the family slugs these weights do not serve (docs/contract.md §9).

    Their routes stay, to answer 404 saying what runs here, but a client generated from the document
    must not offer them. The paths are dropped from the built document, not hidden on the routes:
    the routers are shared by every app of the process (tests, Ray replicas), whatever each loads.
    """
    served = set(SERVED_SLUGS[family])
    unserved = {slug for slugs in SERVED_SLUGS.values() for slug in slugs} - served
    hidden = {f"/{version}/{slug}" for version in ("v1", "v2") for slug in unserved}
    build = app.openapi

    def openapi() -> dict[str, Any]:
        document = build()  # cached by FastAPI: the filter below is idempotent
        document["paths"] = {path: item for path, item in document["paths"].items() if path not in hidden}
        return document

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend it
