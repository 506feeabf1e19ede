"""Every Prometheus metric of sd3-server, defined once, in a registry of the app's own.

A registry per app (not the process-global default) so that two apps in one process — tests,
or a benchmark running ours beside a baseline — never share or double-register counters.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from decimal import Decimal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Generation takes ~0.5 s (tiny model, small GPU images) to minutes (CPU, offload).
GENERATION_BUCKETS = (0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "sd3_http_requests_total",
            "HTTP requests by route template, method and status code",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "sd3_http_request_duration_seconds",
            "Time from request start to the end of the response, by route template",
            ["route"],
            buckets=GENERATION_BUCKETS,
            registry=self.registry,
        )
        self.generation_seconds = Histogram(
            "sd3_generation_seconds",
            "Seconds from queueing a generation to its last image encoded",
            buckets=GENERATION_BUCKETS,
            registry=self.registry,
        )
        self.generations = Counter(
            "sd3_generations_total", "Generations by outcome", ["outcome"], registry=self.registry
        )
        self.images = Counter("sd3_images_generated_total", "Images generated", registry=self.registry)
        self.credits = Counter(
            "sd3_credits_charged_total", "Credits charged (settled)", registry=self.registry
        )
        self.queue_depth = Gauge(
            "sd3_queue_depth", "Jobs waiting for or running on the device", registry=self.registry
        )

    def track_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def generated(self, *, seconds: float, images: int, cost: Decimal) -> None:
        self.generation_seconds.observe(seconds)
        self.generations.labels(outcome="completed").inc()
        self.images.inc(images)
        self.credits.inc(float(cost))

    def failed(self, outcome: str) -> None:
        self.generations.labels(outcome=outcome).inc()


class RequestMetrics:
    """ASGI middleware counting every response by route *template*, so ids do not explode labels."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an exception that escapes every handler ends as a 500

        async def observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(template, scope["method"], str(status)).inc()
            self.metrics.request_seconds.labels(template).observe(time.perf_counter() - started)
