"""The Ray Serve application: one replica of the whole server per GPU, behind Ray's HTTP proxy.

Imported only with the `ray` extra (`pip install "sd3-server[ray]"`). Each replica is the complete
FastAPI app of `server.app.create_app`, lifespan included, so each one loads its own model and runs
its own device queue, prompt cache and rate limiter. What must be one for the whole cluster lives
outside the replicas: the ledger and the job store (one database URL, PostgreSQL in production) and
the outputs folder (one shared path). A v2 job submitted through one replica can therefore be
polled through any other.

Three ways in:
- `sd3-server serve --ray --replicas N` calls `run_ray(settings, ScaleOptions(...))`;
- `serve run docker/ray-serve.yaml` (or `serve run server.ray_app:app_builder replicas=2`) calls
  `app_builder`, which reads `Settings` from the `SD3_*` environment of the cluster;
- Python: `serve.run(build_app(settings, ScaleOptions(...)))`.

Crash recovery. A plain server names its reservations with a stable `instance_id` and refunds what
it left open when it starts again. Ray replicas have no stable identity (a replacement gets a new
id, and replica ranks are renumbered while replicas run), so each replica owns its rows under
`<base>/<app>#<deployment>#<replica id>`, which is unique. A starting replica then settles the
estate of the dead ones: every owner under its own `<base>/<app>#<deployment>#` prefix with
reservations still open and no live Ray actor is refunded, and its unfinished jobs are marked failed.
`<base>` is `settings.instance_id` (default "sd3"): two Ray clusters sharing one database must give
different ones, because a replica can only see the actors of its own cluster.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application
from sqlalchemy import select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.config import Settings
from server.db.migrations import upgrade_to_head

log = logging.getLogger(__name__)

APP_NAME = "sd3"
DEPLOYMENT_NAME = "sd3"
DEFAULT_OWNER_BASE = "sd3"
# Ray's namespace for the actors Serve creates (ray.serve._private.constants.SERVE_NAMESPACE).
SERVE_NAMESPACE = "serve"
# Requests a replica accepts beyond the device queue's `max_pending`: health checks, v2 polls, credit
# look-ups and 406s must not wait behind generations at Ray's router.
EXTRA_ONGOING_REQUESTS = 8
REPLICA_HEADER = "x-replica"


class ScaleOptions(BaseModel):
    """How many replicas, and what each one reserves on the cluster.

    Also the argument model of `app_builder`, so `serve run server.ray_app:app_builder replicas=2`
    validates its key=value arguments against it.
    """

    # A fixed number of replicas; None: autoscale between min_replicas and max_replicas. Fixed by
    # default because Ray lets an autoscaling_config set here win over a Serve config file's
    # num_replicas, whereas a config file's autoscaling_config does win over num_replicas set here.
    replicas: int | None = Field(1, ge=1)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    # Ongoing requests per replica the autoscaler aims at. A GPU renders one batch at a time, so a
    # small target adds a replica as soon as requests start to wait for the device.
    target_ongoing_requests: float = Field(2.0, gt=0)
    # None: one GPU per replica when the cluster has GPUs (a replica drives exactly one device: the
    # queue serialises work on it), none otherwise.
    gpus_per_replica: float | None = Field(None, ge=0)
    # CPU-only replicas: Ray also sets OMP_NUM_THREADS to this, i.e. torch's thread count.
    cpus_per_replica: float = Field(1.0, gt=0)
    # None: the device queue's max_pending + EXTRA_ONGOING_REQUESTS, so the replica's own queue
    # answers 429 + Retry-After when it is full, exactly as a single server does.
    max_ongoing_requests: int | None = Field(None, ge=1)
    # In-flight generations are allowed to finish when a replica is scaled down or replaced; past
    # this they are cancelled (and refunded).
    graceful_shutdown_timeout_s: float = Field(120.0, ge=0)


@dataclass(frozen=True)
class ReplicaIdentity:
    app: str
    deployment: str
    replica: str

    def owner(self, base: str) -> str:
        return f"{self.owner_prefix(base)}{self.replica}"

    def owner_prefix(self, base: str) -> str:
        return f"{base}/{self.app}#{self.deployment}#"

    def actor_name(self, replica: str) -> str:
        # How Serve names a replica's actor (ReplicaID.to_full_id_str).
        return f"SERVE_REPLICA::{self.app}#{self.deployment}#{replica}"


def _current_identity() -> ReplicaIdentity:
    context = serve.get_replica_context()
    return ReplicaIdentity(app=context.app_name, deployment=context.deployment, replica=context.replica_tag)


def _actor_alive(name: str) -> bool:
    import ray

    try:
        ray.get_actor(name, namespace=SERVE_NAMESPACE)
    except ValueError:  # Ray's answer for "no live actor of that name"
        return False
    return True


def settle_dead_replicas(settings: Settings, identity: ReplicaIdentity, *, base: str) -> list[str]:
    """Refund the open reservations of this deployment's dead replicas; returns the refunded ids.

    Runs before the replica's own lifespan, so the refunds are done before it takes traffic. Two
    replicas starting together may both try: refunds are idempotent (only the transaction that flips
    a charge from reserved gives the credits back).
    """
    from server.db.tables import charges
    from server.job_store import JobStore
    from server.ledger import Ledger

    prefix = identity.owner_prefix(base)
    ledger = Ledger(settings.resolved_database_url)
    try:
        with ledger.engine.connect() as conn:
            owners = set(
                conn.execute(
                    select(charges.c.owner)
                    .where(charges.c.status == "reserved")
                    .where(charges.c.owner.startswith(prefix, autoescape=True))
                    .distinct()
                ).scalars()
            )
        jobs = JobStore(ledger.engine)
        refunded: list[str] = []
        for owner in sorted(owners):
            replica = owner[len(prefix) :]
            if replica == identity.replica or _actor_alive(identity.actor_name(replica)):
                continue
            for request_id in ledger.abandoned(owner):
                # v2 jobs are not resumed on another replica: that would need moving their rows to a new
                # owner; the client sees FAILED with its credits back and can submit again. Failed
                # before refunded, so no reader sees a refunded job still PROCESSING.
                jobs.failed(request_id, error="Interrupted: the replica serving it stopped; refunded")
                ledger.refund(request_id)
                refunded.append(request_id)
        if refunded:
            log.warning("refunded %d request(s) left open by dead replicas", len(refunded))
        return refunded
    finally:
        ledger.close()


@serve.ingress()
class SD3Replica:
    """One replica: its own model, queue and lifespan; the ledger, jobs and outputs are shared."""

    def __init__(self, settings: Settings) -> None:
        # Blocking is fine here: Serve runs user code on its own thread and event loop, so the replica
        # still answers the controller while real weights load (minutes), and takes no traffic before.
        identity = _current_identity()
        base = settings.instance_id or DEFAULT_OWNER_BASE
        self.settings = settings.model_copy(update={"instance_id": identity.owner(base)})
        self.replica = identity.replica
        # Before the first repository: the dead replicas' reservations are read next, and the
        # replicas of a new deployment race here on a new database (the upgrade locks it).
        upgrade_to_head(self.settings.resolved_database_url)
        settle_dead_replicas(self.settings, identity, base=base)
        from server.runtime import load_runtime

        self.runtime = load_runtime(self.settings)
        log.info("replica %s: %s", self.settings.instance_id, self.runtime.description)

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Built here rather than passed to @serve.ingress: the app's lifespan needs this replica's
        # own runtime and instance_id, and Serve runs that lifespan in the replica after this call.
        from server.app import create_app

        app = create_app(self.settings, self.runtime)
        app.add_middleware(ReplicaHeader, replica=self.replica)
        return app


class ReplicaHeader:
    """Adds `x-replica: <replica id>` to every response: which replica answered, for operators
    following a request through the logs and for tests proving that load was spread. The id is Ray's
    random replica tag, which says nothing about hosts or addresses."""

    def __init__(self, app: ASGIApp, *, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def deployment_options(settings: Settings, options: ScaleOptions) -> dict[str, Any]:
    """The keyword arguments of `serve.deployment(...).options(...)` for these settings."""
    gpus = options.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if _cluster_gpus() > 0 else 0.0
    actor: dict[str, Any] = {"num_cpus": options.cpus_per_replica}
    if gpus > 0:
        actor["num_gpus"] = gpus
    max_ongoing = options.max_ongoing_requests or settings.queue.max_pending + EXTRA_ONGOING_REQUESTS
    scale: dict[str, Any]
    if options.replicas is not None:
        scale = {"num_replicas": options.replicas}
    else:
        if options.max_replicas < options.min_replicas:
            raise ValueError(
                f"max_replicas ({options.max_replicas}) is below min_replicas ({options.min_replicas})"
            )
        scale = {
            "autoscaling_config": {
                "min_replicas": options.min_replicas,
                "max_replicas": options.max_replicas,
                "target_ongoing_requests": options.target_ongoing_requests,
            }
        }
    return {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": actor,
        "max_ongoing_requests": max_ongoing,
        "graceful_shutdown_timeout_s": options.graceful_shutdown_timeout_s,
        **scale,
    }


def build_app(settings: Settings, options: ScaleOptions | None = None) -> Application:
    """The bound Serve application: `serve.run(build_app(settings))`."""
    options = options or ScaleOptions()
    # Replicas may start in another working directory (or on another node): make the data dir absolute
    # here, where the caller's relative path means what the caller meant.
    settings = settings.model_copy(update={"data_dir": Path(settings.data_dir).resolve()})
    deployment = serve.deployment(**deployment_options(settings, options))(SD3Replica)
    return deployment.bind(settings)


def app_builder(args: ScaleOptions) -> Application:
    """Entry point of `serve run server.ray_app:app_builder [key=value ...]` and of the Serve config.

    Settings come from the `SD3_*` environment variables of the cluster (`runtime_env.env_vars` in a
    Serve config file); the key=value arguments are `ScaleOptions` fields.
    """
    return build_app(Settings(), args)


def run_ray(settings: Settings, options: ScaleOptions | None = None, *, address: str | None = None) -> None:
    """Serve the API with Ray on settings.host:settings.port until interrupted (`serve --ray`).

    `address`: an existing Ray cluster ("auto", "ray://head:10001"); None starts a local one unless
    RAY_ADDRESS is set. Ray's HTTP options are cluster-wide: a cluster already serving on another port
    keeps it.
    """
    import ray

    ray.init(address=address)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_app(settings, options), name=APP_NAME, route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a foreground server is stopped, not an error
    finally:
        # As `serve run` does: take our application down (on a shared cluster, only ours); the replicas'
        # lifespans refund what they still had in flight. A local cluster ends with ray.shutdown().
        serve.delete(APP_NAME)
        ray.shutdown()
