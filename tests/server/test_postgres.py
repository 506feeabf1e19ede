"""The ledger, the job store and a live server on a real PostgreSQL (`SD3_TEST_POSTGRES_URL`).

`.ci/postgres.sh` starts one and writes the variable to `.ci/postgres.env`. Without it these tests
skip locally but fail when `CI` is set, so that CI can never pass without having tested PostgreSQL.
The database outlives the run: every key, request id and server instance name here is unique.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from server.job_store import JobStore
from server.ledger import Ledger

if TYPE_CHECKING:
    # Not at run time: the spawned worker processes import this module, and the app would bring
    # torch and diffusers along, seconds per process.
    from server.config import Settings
    from server.runtime import Runtime
from tests.databases import migrated
from tests.ledger_race import reserve_and_report
from tests.live import LiveServer
from tests.postgres import postgres_url_or_skip

PRICE = Decimal("0.039")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def postgres_url() -> str:
    return postgres_url_or_skip()


@pytest.fixture(scope="module")
def ledger(postgres_url: str) -> Iterator[Ledger]:
    ledger = Ledger(migrated(postgres_url))
    yield ledger
    ledger.close()


def audit_of(ledger: Ledger, name: str) -> Any:
    # Only our own key: other runs' keys share the database and are not this test's business.
    [row] = [row for row in ledger.audit() if row.name == name]
    return row


# --- spending races ---------------------------------------------------------------------------------


def reserve_in_process(
    url: str, key_id: int, attempts: int, tag: str, ready: Any, go: Any, results: Any
) -> None:
    # Its own Ledger, engine and connections, as a separate server worker would have.
    ledger = Ledger(url)
    ready.put(None)
    go.wait()
    for index in range(attempts):
        reserve_and_report(ledger, key_id=key_id, amount=PRICE, request_id=f"{tag}-{index}", results=results)
    ledger.close()


@pytest.mark.postgres
def test_threads_and_processes_racing_spend_exactly_the_balance(ledger: Ledger, postgres_url: str) -> None:
    images, threads_count, processes_count, attempts_per_process = 5, 8, 3, 4
    name = unique("race")
    record, _ = ledger.create_key(name=name, credits=PRICE * images)
    tag = uuid.uuid4().hex[:16]
    # spawn: every process starts clean, as separate server workers would.
    context = multiprocessing.get_context("spawn")
    ready, results, go = context.Queue(), context.Queue(), context.Event()
    processes = [
        context.Process(
            target=reserve_in_process,
            args=(postgres_url, record.id, attempts_per_process, f"{tag}-p{index}", ready, go, results),
        )
        for index in range(processes_count)
    ]
    for process in processes:
        process.start()
    for _ in processes:
        ready.get(timeout=60)

    barrier = threading.Barrier(threads_count + 1)

    def reserve_in_thread(index: int) -> None:
        barrier.wait()
        reserve_and_report(
            ledger, key_id=record.id, amount=PRICE, request_id=f"{tag}-t{index}", results=results
        )

    threads = [threading.Thread(target=reserve_in_thread, args=(index,)) for index in range(threads_count)]
    for thread in threads:
        thread.start()
    # Threads and processes are released together, so both kinds of contenders really race.
    go.set()
    barrier.wait()
    total = threads_count + processes_count * attempts_per_process
    outcomes = [results.get(timeout=60) for _ in range(total)]
    for thread in threads:
        thread.join()
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0

    assert sorted(outcomes) == ["ok"] * images + ["refused"] * (total - images)
    assert ledger.balance(record.id) == Decimal(0)
    row = audit_of(ledger, name)
    assert row.ok and row.open_reservations == images and row.charged == PRICE * images


def refund_in_process(url: str, request_id: str, ready: Any, go: Any, results: Any) -> None:
    ledger = Ledger(url)
    ready.put(None)
    go.wait()
    try:
        results.put(str(ledger.refund(request_id)))
    except Exception as exc:
        results.put(f"error: {exc!r}")
    ledger.close()


@pytest.mark.postgres
def test_refunds_racing_from_threads_and_processes_give_the_credits_back_once(
    ledger: Ledger, postgres_url: str
) -> None:
    name = unique("refund")
    record, _ = ledger.create_key(name=name, credits=Decimal(1))
    request_id = unique("r")
    ledger.reserve(key_id=record.id, amount=PRICE, request_id=request_id)
    context = multiprocessing.get_context("spawn")
    ready, results, go = context.Queue(), context.Queue(), context.Event()
    processes = [
        context.Process(target=refund_in_process, args=(postgres_url, request_id, ready, go, results))
        for _ in range(3)
    ]
    for process in processes:
        process.start()
    for _ in processes:
        ready.get(timeout=60)
    barrier = threading.Barrier(8 + 1)

    def refund_in_thread() -> None:
        barrier.wait()
        try:
            results.put(str(ledger.refund(request_id)))
        except Exception as exc:
            results.put(f"error: {exc!r}")

    threads = [threading.Thread(target=refund_in_thread) for _ in range(8)]
    for thread in threads:
        thread.start()
    go.set()
    barrier.wait()
    outcomes = [results.get(timeout=60) for _ in range(8 + len(processes))]
    for thread in threads:
        thread.join()
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0

    # Every refund saw the balance with the credits given back exactly once.
    assert [Decimal(outcome) for outcome in outcomes] == [Decimal(1)] * len(outcomes)
    assert ledger.balance(record.id) == Decimal(1)
    assert ledger.charge(request_id) == "refunded"
    row = audit_of(ledger, name)
    assert row.ok and row.open_reservations == 0 and row.charged == 0


@pytest.mark.postgres
def test_audit_agrees_after_grants_settles_refunds_and_abandoned_reservations(ledger: Ledger) -> None:
    name, owner = unique("audit"), unique("instance")
    record, _ = ledger.create_key(name=name, credits=Decimal("0.1"))
    assert ledger.add_credits(name, Decimal("0.05"), note="top-up") == Decimal("0.15")
    settled, refunded, abandoned = unique("s"), unique("r"), unique("a")
    ledger.reserve(key_id=record.id, amount=PRICE, request_id=settled)
    ledger.settle(settled)
    ledger.reserve(key_id=record.id, amount=PRICE, request_id=refunded)
    ledger.refund(refunded)
    ledger.reserve(key_id=record.id, amount=PRICE, request_id=abandoned, owner=owner)
    assert audit_of(ledger, name).open_reservations == 1
    assert ledger.abandoned(owner) == [abandoned]
    ledger.refund(abandoned)
    row = audit_of(ledger, name)
    assert row.ok
    assert (row.granted, row.charged, row.balance) == (Decimal("0.15"), PRICE, Decimal("0.15") - PRICE)
    assert row.open_reservations == 0


# --- job store --------------------------------------------------------------------------------------


@pytest.mark.postgres
def test_job_store_round_trip(ledger: Ledger) -> None:
    jobs = JobStore(ledger.engine)
    record, _ = ledger.create_key(name=unique("jobs"), credits=Decimal(1))
    owner = unique("instance")
    done, broken = unique("job"), unique("job")
    params = {"prompt": "a lighthouse", "samples": 2, "img_width": 512}
    created = jobs.create(
        request_id=done, key_id=record.id, surface="v2", model="sd3", params=params, cost=PRICE, owner=owner
    )
    assert (created.status, created.params, created.cost, created.outputs) == ("QUEUED", params, PRICE, [])
    assert created.created_at.tzinfo is not None
    jobs.create(
        request_id=broken, key_id=record.id, surface="v2", model="sd3", params={}, cost=PRICE, owner=owner
    )
    assert [job.request_id for job in jobs.pending(owner=owner, surface="v2")] == [done, broken]

    jobs.started(done, seed=2**40)
    jobs.progress(done, step=9, total=10)
    running = jobs.get(done)
    assert running is not None
    assert (running.status, running.seed, running.progress_step, running.progress_total) == (
        "PROCESSING",
        2**40,
        10,
        10,
    )
    jobs.completed(done, outputs=["out-1", "out-2"], inference_s=1.25)
    jobs.failed(broken, error="out of memory")

    finished = jobs.get(done)
    assert finished is not None
    assert (finished.status, finished.outputs, finished.inference_s) == (
        "COMPLETED",
        ["out-1", "out-2"],
        1.25,
    )
    assert finished.queue_s is not None and finished.total_s is not None and finished.total_s >= 0
    failed = jobs.get(broken)
    assert failed is not None and (failed.status, failed.error) == ("FAILED", "out of memory")
    assert jobs.pending(owner=owner, surface="v2") == []
    history = jobs.history(record.id, limit=10)
    assert {job.request_id for job in history} == {done, broken}
    assert jobs.history(record.id, limit=10, before=history[-1].created_at) == []
    assert jobs.get(unique("missing")) is None


# --- a live server ----------------------------------------------------------------------------------


@contextmanager
def live_on_postgres(settings: Settings, runtime: Runtime, url: str) -> Iterator[LiveServer]:
    # A fresh instance name: at start-up a server refunds and re-runs what "it" left unfinished, and the
    # database holds earlier runs' rows.
    from tests.live import live_server

    isolated = settings.model_copy(update={"database_url": url, "instance_id": unique("test-instance")})
    server = live_server(isolated, runtime)
    try:
        yield next(server)
    finally:
        server.close()


@pytest.mark.postgres
def test_a_live_server_on_postgresql_serves_a_v1_request_and_a_v2_job(
    settings: Settings, runtime: Runtime, postgres_url: str
) -> None:
    from tests.live import SLUG, SMALL

    with live_on_postgres(settings, runtime, postgres_url) as live:
        # Not live.key(): its names repeat from one run to the next, and this database persists.
        name = unique("live")
        record, key = live.ledger.create_key(name=name, credits=Decimal(1))
        headers = {"x-api-key": key}

        v1 = live.post({"prompt": "a red barn", "seed": 7, **SMALL}, key=key)
        assert v1.status_code == 200, v1.text
        assert v1.headers["content-type"] == "image/jpeg"
        v1_cost = Decimal(v1.headers["x-cost"])
        assert Decimal(v1.headers["x-remaining-credits"]) == Decimal(1) - v1_cost == live.balance_of(key)

        submitted = httpx.post(
            f"{live.base_url}/v2/{SLUG}",
            json={"prompt": "a quiet harbour", "seed": 8, **SMALL},
            headers=headers,
        )
        assert submitted.status_code == 200, submitted.text
        job = submitted.json()
        assert job["status"] == "QUEUED"
        deadline = time.monotonic() + 120
        while True:
            status = httpx.get(job["status_url"], headers=headers, timeout=30).json()
            if status["status"] in ("COMPLETED", "FAILED") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert status["status"] == "COMPLETED", status
        result = httpx.get(
            f"{live.base_url}/v2/requests/{job['request_id']}", headers=headers, timeout=30
        ).json()
        image = httpx.get(result["output"], timeout=30)
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
        v2_cost = Decimal(str(result["metrics"]["cost"]))

        assert live.balance_of(key) == Decimal(1) - v1_cost - v2_cost
        # Both requests are rows in PostgreSQL: the job store and the ledger agree about them.
        history = JobStore(live.ledger.engine).history(record.id, limit=10)
        assert sorted((job.surface, job.status) for job in history) == [
            ("v1", "COMPLETED"),
            ("v2", "COMPLETED"),
        ]
        row = audit_of(live.ledger, name)
        assert row.ok and row.open_reservations == 0 and row.charged == v1_cost + v2_cost


def test_without_a_database_ci_fails_where_a_local_run_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SD3_TEST_POSTGRES_URL", raising=False)
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="CI must test PostgreSQL"):
        postgres_url_or_skip()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        postgres_url_or_skip()
