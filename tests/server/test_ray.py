"""Ray Serve: two replicas of the tiny model behind Ray's proxy share one ledger, job store and outputs.

A real local Ray cluster (2 logical CPUs, no dashboard), the real `server.ray_app` application and
plain HTTP clients. Without Ray installed (the `ray` extra) the test skips locally and fails in CI,
so a CI that forgot the extra cannot pass by skipping.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.config import Settings
from server.job_store import JobRecord, JobStore
from server.keys import hash_key
from server.ledger import Ledger
from server.pricing import price_of
from tests.databases import migrated
from tests.faults import killed_at
from tests.live import SLUG, SMALL, free_port

pytestmark = pytest.mark.ray

# Owners of the rows written by the replicas of app "sd3", deployment "sd3" (server.ray_app).
OWNER_PREFIX = "sd3/sd3#sd3#"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"Ray Serve is required in CI: {reason}")
    pytest.skip(f"Ray Serve unavailable: {reason} (install the `ray` extra: pip install -e '.[ray]')")


@dataclass
class RayDeployment:
    base_url: str
    settings: Settings
    ledger: Ledger


@pytest.fixture(scope="module")
def ray_deployment(
    request: pytest.FixtureRequest, settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RayDeployment]:
    try:
        import ray
        from ray import serve

        from server.ray_app import APP_NAME, ScaleOptions, build_app
    except ImportError as exc:
        _unavailable(f"cannot import it ({exc})")
    request.getfixturevalue("tiny_dir")  # built once per session; only needed once Ray is there
    db = tmp_path_factory.mktemp("ray-ledger") / "ledger.sqlite3"
    # The session's data dir holds the tiny model already built; both replicas load it from there.
    shared = settings.model_copy(update={"database_url": f"sqlite:///{db}"})
    ledger = Ledger(migrated(shared.resolved_database_url))  # creates the tables before the replicas race to
    # A reservation left open by a replica of an earlier run that died (kill -9, lost node): the
    # replicas about to start must refund it, since no replica with that id will ever settle it.
    _open_request(ledger, owner=f"{OWNER_PREFIX}deadbeef", request_id="left-by-a-dead-replica")
    try:
        # Local only: no dashboard, no usage reporting, 2 logical CPUs = one per replica.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except Exception as exc:  # Ray's start-up raises many kinds (RuntimeError, ConnectionError, …)
        ledger.close()
        _unavailable(f"ray.init failed ({exc!r})")
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # Four ongoing requests per replica: eight concurrent requests must use both replicas.
        options = ScaleOptions(replicas=2, gpus_per_replica=0, cpus_per_replica=1, max_ongoing_requests=4)
        serve.run(build_app(shared, options), name=APP_NAME, route_prefix="/")
        yield RayDeployment(f"http://127.0.0.1:{port}", shared, ledger)
    finally:
        serve.shutdown()
        ray.shutdown()
        ledger.close()


def _open_request(ledger: Ledger, *, owner: str, request_id: str) -> int:
    """A v1 request admitted by `owner` and never finished: reserved credits, a QUEUED job row."""
    record, _ = ledger.create_key(name=f"key-of-{request_id}", credits=Decimal(1))
    ledger.reserve(key_id=record.id, amount=Decimal("0.25"), request_id=request_id, owner=owner)
    JobStore(ledger.engine).create(
        request_id=request_id,
        key_id=record.id,
        surface="v1",
        model="m",
        params={},
        cost=Decimal("0.25"),
        owner=owner,
    )
    return record.id


def _key(ledger: Ledger, name: str, credits: Decimal) -> tuple[int, str]:
    record, key = ledger.create_key(name=name, credits=credits)
    return record.id, key


def test_two_replicas_share_one_ledger_and_never_overspend(ray_deployment: RayDeployment) -> None:
    ledger = ray_deployment.ledger
    price = price_of(width=512, height=512, steps=10, samples=1, pricing=ray_deployment.settings.pricing)
    key_id, key = _key(ledger, "ray-v1", 6 * price)

    def post(i: int) -> httpx.Response:
        return httpx.post(
            f"{ray_deployment.base_url}/v1/{SLUG}",
            json={"prompt": f"a lighthouse {i}", "seed": i, **SMALL},
            headers={"x-api-key": key},
            timeout=120,
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(post, range(8)))

    codes = sorted(response.status_code for response in responses)
    assert codes == [200] * 6 + [406] * 2, [
        r.text[:200] for r in responses if r.status_code not in (200, 406)
    ]
    assert all(r.headers["content-type"] == "image/jpeg" for r in responses if r.status_code == 200)
    record = ledger.find_by_hash(hash_key(key))
    assert record is not None and record.balance == Decimal(0)
    assert all(row.ok for row in ledger.audit())

    # Spread over both replicas: each replica records its jobs under its own instance_id.
    rows = JobStore(ledger.engine).history(key_id, limit=20)
    assert len(rows) == 6 and all(row.status == "COMPLETED" for row in rows)
    owners = {row.owner for row in rows}
    assert len(owners) == 2, owners
    assert all(owner.startswith(OWNER_PREFIX) for owner in owners)
    assert len({r.headers["x-replica"] for r in responses}) == 2


def test_a_v2_job_is_answered_by_any_replica(ray_deployment: RayDeployment) -> None:
    _, key = _key(ray_deployment.ledger, "ray-v2", Decimal(1))
    headers = {"x-api-key": key}
    base = ray_deployment.base_url
    submitted = httpx.post(
        f"{base}/v2/{SLUG}", json={"prompt": "a harbour", "seed": 3, **SMALL}, headers=headers, timeout=60
    )
    assert submitted.status_code == 200, submitted.text
    request_id = submitted.json()["request_id"]
    runs_on = submitted.headers["x-replica"]

    # Poll until the job is done AND a replica that did not run it has answered: the status comes
    # from the shared database, not from the memory of the replica running the job.
    answered_by: set[str] = set()
    status: dict[str, Any] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        response = httpx.get(f"{base}/v2/requests/{request_id}/status", headers=headers, timeout=30)
        assert response.status_code == 200, response.text
        status = response.json()
        answered_by.add(response.headers["x-replica"])
        if status["status"] == "COMPLETED" and answered_by - {runs_on}:
            break
        time.sleep(0.05)
    assert status["status"] == "COMPLETED"
    assert answered_by - {runs_on}, "every poll reached the replica running the job"

    # The result and its image are served by whichever replica answers (shared outputs folder).
    for _ in range(4):
        result = httpx.get(f"{base}/v2/requests/{request_id}", headers=headers, timeout=30).json()
        image = httpx.get(result["output"], timeout=30)
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert all(row.ok for row in ray_deployment.ledger.audit())


def test_starting_replicas_refund_what_dead_replicas_left_open(ray_deployment: RayDeployment) -> None:
    from server.ray_app import ReplicaIdentity, settle_dead_replicas

    ledger = ray_deployment.ledger
    jobs = JobStore(ledger.engine)
    # Refunded by the replicas of the fixture as they started.
    dead = jobs.get("left-by-a-dead-replica")
    assert dead is not None and dead.status == "FAILED" and "refunded" in (dead.error or "")
    assert ledger.balance(dead.key_id) == Decimal(1)

    # A live replica's reservation is in flight, not abandoned: a starting replica leaves it alone.
    live_replica = httpx.get(f"{ray_deployment.base_url}/health", timeout=30).headers["x-replica"]
    live_key = _open_request(ledger, owner=f"{OWNER_PREFIX}{live_replica}", request_id="in-flight")
    dead_key = _open_request(ledger, owner=f"{OWNER_PREFIX}0dead0", request_id="abandoned")
    starting = ReplicaIdentity(app="sd3", deployment="sd3", replica="newcomer")
    assert settle_dead_replicas(ray_deployment.settings, starting, base="sd3") == ["abandoned"]
    assert ledger.balance(dead_key) == Decimal(1)
    assert ledger.balance(live_key) == Decimal("0.75")
    ledger.refund("in-flight")
    assert all(row.ok for row in ledger.audit())


def test_a_replica_killed_mid_generation_is_refunded_by_its_replacement(
    ray_deployment: RayDeployment,
) -> None:
    import ray

    from server.ray_app import SERVE_NAMESPACE, ReplicaIdentity

    ledger = ray_deployment.ledger
    key_id, key = _key(ledger, "ray-crash", Decimal(1))
    slow = {"prompt": "slow", "img_width": 1024, "img_height": 1024, "num_inference_steps": 100}
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(
            httpx.post,
            f"{ray_deployment.base_url}/v1/{SLUG}",
            json=slow,
            headers={"x-api-key": key},
            timeout=120,
        )
        jobs = JobStore(ledger.engine)
        deadline = time.monotonic() + 60
        rows: list[JobRecord] = []
        while not rows and time.monotonic() < deadline:
            rows = [row for row in jobs.history(key_id, limit=1) if row.status == "PROCESSING"]
            time.sleep(0.05)
        assert rows, "the slow request never started"
        assert ledger.balance(key_id) < Decimal(1)  # reserved
        # kill -9 of the replica rendering it: no refund path of its own can run.
        replica = rows[0].owner.removeprefix(OWNER_PREFIX)
        actor = ReplicaIdentity(app="sd3", deployment="sd3", replica=replica).actor_name(replica)
        ray.kill(ray.get_actor(actor, namespace=SERVE_NAMESPACE), no_restart=True)
        assert pending.result().status_code >= 500
    # Serve starts a replacement at once; it refunds the dead replica's reservation before serving.
    deadline = time.monotonic() + 90
    while ledger.balance(key_id) != Decimal(1) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ledger.balance(key_id) == Decimal(1)
    job = jobs.get(rows[0].request_id)
    assert job is not None and job.status == "FAILED"
    assert all(row.ok for row in ledger.audit())


def test_a_replica_killed_between_failing_and_refunding_a_dead_peer_s_request_leaves_it_to_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    try:
        from server import ray_app
    except ImportError as exc:
        _unavailable(f"cannot import it ({exc})")
    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    ledger = Ledger(migrated(settings.resolved_database_url))
    jobs = JobStore(ledger.engine)
    key_id = _open_request(ledger, owner=f"{OWNER_PREFIX}0dead0", request_id="cut")
    monkeypatch.setattr(ray_app, "_actor_alive", lambda name: False)  # no cluster: every peer is dead
    starting = ray_app.ReplicaIdentity(app="sd3", deployment="sd3", replica="newcomer")

    with killed_at(monkeypatch, Ledger, "refund"):
        ray_app.settle_dead_replicas(settings, starting, base="sd3")
    job = jobs.get("cut")
    assert job is not None and job.status == "FAILED"  # no reader sees it running ...
    assert ledger.charge("cut") == "reserved" and ledger.balance(key_id) == Decimal(
        "0.75"
    )  # ... nor refunded

    # The next replica to start refunds it; the one after finds nothing left to do.
    assert ray_app.settle_dead_replicas(settings, starting, base="sd3") == ["cut"]
    assert ray_app.settle_dead_replicas(settings, starting, base="sd3") == []
    job = jobs.get("cut")
    assert job is not None and job.status == "FAILED" and ledger.balance(key_id) == Decimal(1)
    assert all(row.ok and row.open_reservations == 0 for row in ledger.audit())
    ledger.close()
