"""Admission, cancellation and refunds: a client that leaves is never charged, a refund always lands.

Everything is real: a uvicorn server on loopback (in this process, or `sd3-server serve` as a
child process for SIGTERM), the tiny model, SQLite files. The database is made to fail the way it
does in production: another connection holding the write lock (`BEGIN IMMEDIATE`), and triggers
that refuse a write as a full disk would.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import socket
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.request import GenerationRequest
from pipelines.sd3 import SD3Generator, batch_key
from server.app import Runtime
from server.cli import app as cli
from server.config import Settings
from server.job_store import JobRecord, JobStore
from server.ledger import Ledger
from server.queue import WorkQueue
from tests.live import SLUG, LiveServer, live_server

SLOW = {"prompt": "slow", "img_width": 1024, "img_height": 1024, "num_inference_steps": 100}
ROUTE = f"/v1/{SLUG}"
# The storm: this many rounds of 16 clients that each leave 0.15-0.6 s after sending.
ROUNDS = 5


@pytest.fixture
def server(settings: Settings, runtime: Runtime, tmp_path: Path) -> Iterator[LiveServer]:
    """A live server on a database of its own, which the test may lock or break."""
    db = tmp_path / "ledger.sqlite3"
    yield from live_server(settings.model_copy(update={"database_url": f"sqlite:///{db}"}), runtime)


def database_file(live: LiveServer) -> str:
    return live.settings.resolved_database_url.removeprefix("sqlite:///")


@contextmanager
def write_lock(live: LiveServer) -> Iterator[None]:
    """Hold the database's write lock from another connection, as a long transaction would."""
    conn = sqlite3.connect(database_file(live), isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def execute(live: LiveServer, *statements: str) -> None:
    conn = sqlite3.connect(database_file(live), isolation_level=None)
    try:
        for statement in statements:
            conn.execute(statement)
    finally:
        conn.close()


def send_and_leave(live: LiveServer, body: dict, *, key: str) -> socket.socket:
    """Send a v1 request on a raw socket and return it unread: closing it is the client leaving."""
    payload = json.dumps(body).encode()
    host, port = live.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (
        f"POST {ROUTE} HTTP/1.1\r\nHost: {host}\r\nx-api-key: {key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


def answered(live: LiveServer, status: int) -> float:
    """How many v1 generation requests the server has answered with `status` (its own metrics)."""
    registry = live.app.state.metrics.registry  # type: ignore[attr-defined]
    labels = {"route": ROUTE, "method": "POST", "status": str(status)}
    return registry.get_sample_value("sd3_http_requests_total", labels) or 0.0


def answered_in_all(live: LiveServer) -> float:
    return sum(answered(live, status) for status in (200, 429, 499, 500, 503))


def open_reservations(live: LiveServer) -> int:
    return sum(row.open_reservations for row in live.ledger.audit())


def jobs_of(live: LiveServer) -> list[JobRecord]:
    """The history of the server's first key (each test here has a database of its own)."""
    store = live.app.state.serving.jobs  # type: ignore[attr-defined]
    return store.history(live.ledger.list_keys()[0].id, limit=100)  # type: ignore[no-any-return]


def audit_exit_code(live: LiveServer) -> int:
    url = live.settings.resolved_database_url
    result = CliRunner().invoke(cli, ["credits", "audit", "--database-url", url])
    return result.exit_code


# -- job states ---------------------------------------------------------------------------------


def new_job(store: JobStore, ledger: Ledger, request_id: str, *, key_id: int) -> None:
    ledger.reserve(key_id=key_id, amount=Decimal("0.1"), request_id=request_id, owner="me")
    store.create(
        request_id=request_id,
        key_id=key_id,
        surface="v2",
        model="m",
        params={},
        cost=Decimal("0.1"),
        owner="me",
    )


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    yield ledger
    ledger.close()


def test_a_finished_job_never_goes_back_to_processing(ledger: Ledger) -> None:
    store = JobStore(ledger.engine)
    key, _ = ledger.create_key(name="k", credits=Decimal(1))
    new_job(store, ledger, "failed-first", key_id=key.id)
    new_job(store, ledger, "completed-first", key_id=key.id)
    store.failed("failed-first", error="cancelled")
    store.completed("completed-first", outputs=["out"], inference_s=1.0)
    # The device thread's writes arrive late, after the request was finished on the event loop.
    for request_id in ("failed-first", "completed-first"):
        store.started(request_id, seed=1, total=10)
        store.progress(request_id, step=9, total=10)
    store.completed("failed-first", outputs=["late"], inference_s=2.0)
    store.failed("completed-first", error="late")

    def assert_unchanged() -> None:
        failed, completed = store.get("failed-first"), store.get("completed-first")
        assert failed is not None and completed is not None
        assert (failed.status, failed.error, failed.outputs) == ("FAILED", "cancelled", [])
        assert failed.progress_step == 0
        assert (completed.status, completed.outputs, completed.error) == ("COMPLETED", ["out"], None)

    assert_unchanged()
    store.requeue(["failed-first", "completed-first"])  # what a stopping server does to its v2 jobs
    assert_unchanged()


# -- the audit ----------------------------------------------------------------------------------


def test_the_audit_fails_on_a_reservation_nothing_will_settle_or_refund(ledger: Ledger) -> None:
    store = JobStore(ledger.engine)
    key, _ = ledger.create_key(name="k", credits=Decimal(1))
    new_job(store, ledger, "running", key_id=key.id)
    new_job(store, ledger, "finished", key_id=key.id)
    ledger.reserve(key_id=key.id, amount=Decimal("0.1"), request_id="no-job", owner="me")
    store.started("running", seed=1)
    store.failed("finished", error="failed, refund pending")
    # Just now: the refund of a failure follows its status by moments, so nothing is stale yet.
    [row] = ledger.audit()
    assert row.ok and (row.open_reservations, row.stale_reservations) == (3, 0)
    url = str(ledger.engine.url)
    assert CliRunner().invoke(cli, ["credits", "audit", "--database-url", url]).exit_code == 0
    # Ten minutes later, the failed job's and the job-less reservations are still open.
    past = datetime.now(timezone.utc) - timedelta(minutes=10)
    with ledger.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE jobs SET finished_at = ?, created_at = ?", (past, past))
        conn.exec_driver_sql("UPDATE charges SET created_at = ?, updated_at = ?", (past, past))
    [row] = ledger.audit()
    assert row.balanced and row.stale_reservations == 2 and not row.ok
    result = CliRunner().invoke(cli, ["credits", "audit", "--database-url", url])
    assert result.exit_code == 1 and "Stale reservations" in result.output
    # The running job's reservation is its request's to settle: once the others are refunded, ok.
    ledger.refund("finished")
    ledger.refund("no-job")
    [row] = ledger.audit()
    assert row.ok and (row.open_reservations, row.stale_reservations) == (1, 0)


# -- the queue ----------------------------------------------------------------------------------


class Blocker:
    """Holds the device on a first job until released, so that others wait behind it."""

    def __init__(self, generator: SD3Generator) -> None:
        self.generator = generator
        self.started = threading.Event()
        self.release = threading.Event()

    def generate_batch(self, requests, *, callback=None):  # type: ignore[no-untyped-def]
        if requests[0].prompt == "block":
            self.started.set()
            self.release.wait(30)
        return self.generator.generate_batch(requests, callback=callback)


def test_jobs_whose_waiters_left_log_no_unretrieved_future_errors(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    assert isinstance(runtime.generator, SD3Generator)
    blocker = Blocker(runtime.generator)
    queue = WorkQueue(blocker, batch_key=batch_key, max_pending=16, retry_after_s=1)
    small = {"width": 512, "height": 512, "steps": 10}

    async def scenario() -> None:
        first = asyncio.create_task(queue.submit(GenerationRequest(prompt="block", seed=0, **small)))
        await asyncio.to_thread(blocker.started.wait, 30)
        gone = [
            asyncio.create_task(queue.submit(GenerationRequest(prompt=f"gone {i}", seed=i, **small)))
            for i in range(3)
        ]
        await asyncio.sleep(0)  # they are queued
        for task in gone:
            task.cancel()
        await asyncio.gather(*gone, return_exceptions=True)
        blocker.release.set()
        await first
        # The device skips the cancelled jobs and resolves their futures, which nobody awaits now.
        while queue.pending:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # the deliveries scheduled before `pending` dropped

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        try:
            asyncio.run(scenario())
        finally:
            queue.shutdown()
        gc.collect()  # an unretrieved exception is logged when its future is collected
    assert not [record for record in caplog.records if "never retrieved" in record.getMessage()]
