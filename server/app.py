"""`create_app(settings, runtime)`: the FastAPI application, wired once, around a model that
`server.runtime.load_runtime` has loaded before it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from pipelines.options import Family
from pipelines.sd3 import batch_key
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
from server.queue import WorkQueue
from server.runtime import Runtime
from server.schemas import SERVED_SLUGS
from server.serving import Serving


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
