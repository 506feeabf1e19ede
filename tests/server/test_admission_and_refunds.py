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
import random
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import NoReturn

import httpx
import pytest
import torch
from typer.testing import CliRunner

from pipelines.request import GenerationRequest, GenerationResult
from pipelines.sd3 import SD3Generator, StepCallback, batch_key
from server.cli import app as cli
from server.config import Settings
from server.job_store import JobRecord, JobStore
from server.ledger import Ledger
from server.queue import WorkQueue
from server.runtime import Runtime
from tests.databases import migrated
from tests.live import SLUG, SMALL, LiveServer, ServerProcess, job_status_is, live_server, wait_for

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
    registry = live.app.state.metrics.registry
    labels = {"route": ROUTE, "method": "POST", "status": str(status)}
    return registry.get_sample_value("sd3_http_requests_total", labels) or 0.0


def answered_in_all(live: LiveServer) -> float:
    return sum(answered(live, status) for status in (200, 429, 499, 500, 503))


def open_reservations(live: LiveServer) -> int:
    return sum(row.open_reservations for row in live.ledger.audit())


def jobs_of(live: LiveServer) -> list[JobRecord]:
    """The history of the server's first key (each test here has a database of its own)."""
    store: JobStore = live.app.state.serving.jobs
    return store.history(live.ledger.list_keys()[0].id, limit=100)


def audit_exit_code(live: LiveServer) -> int:
    url = live.settings.resolved_database_url
    result = CliRunner().invoke(cli, ["credits", "audit", "--database-url", url])
    return result.exit_code


# -- admission ----------------------------------------------------------------------------------


def test_a_client_gone_while_admission_waits_for_the_database_is_not_charged(server: LiveServer) -> None:
    key = server.key("1")
    with write_lock(server):
        # The reservation waits for the lock in a worker thread; the client gives up meanwhile.
        sock = send_and_leave(server, {"prompt": "impatient", **SMALL}, key=key)
        time.sleep(1)  # the scenario itself: a client that waits one second, then closes
        sock.close()
        assert wait_for(lambda: answered(server, 499) == 1, timeout=10), "the disconnect was not seen"
    # The lock is gone: the reservation commits now, after its client left, and must be undone.
    assert wait_for(lambda: [job.status for job in jobs_of(server)] == ["FAILED"], timeout=30)
    assert wait_for(lambda: open_reservations(server) == 0), "the charge stayed reserved"
    assert server.balance_of(key) == Decimal("1")
    assert "Cancelled" in (jobs_of(server)[0].error or "")
    assert audit_exit_code(server) == 0


def test_a_storm_of_clients_that_leave_early_leaves_no_reservation_open(server: LiveServer) -> None:
    keys = [server.key("1") for _ in range(16)]
    rng = random.Random(11)

    def client(key: str, round_: int) -> None:
        sock = send_and_leave(server, {"prompt": f"storm {round_}", **SMALL}, key=key)
        time.sleep(rng.uniform(0.15, 0.6))
        sock.close()

    for round_ in range(ROUNDS):
        threads = [threading.Thread(target=client, args=(key, round_)) for key in keys]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    sent = len(keys) * ROUNDS
    assert wait_for(lambda: answered_in_all(server) == sent, timeout=120), "not every request was answered"
    assert wait_for(lambda: open_reservations(server) == 0, timeout=60), (
        f"{open_reservations(server)} reservation(s) left open"
    )
    # Every key paid exactly for what was delivered (requests that finished before their client
    # left were generated and settled): the books balance and nothing is stale.
    assert audit_exit_code(server) == 0


# -- refunds off the event loop, retried until they land ----------------------------------------


def test_a_refund_blocked_by_a_locked_database_neither_freezes_the_server_nor_is_lost(
    server: LiveServer,
) -> None:
    key = server.key("1")
    sock = send_and_leave(server, SLOW, key=key)
    try:
        assert wait_for(lambda: server.balance_of(key) < Decimal("1")), "the request was never admitted"
        with write_lock(server):
            sock.close()  # the refund now has to wait for the lock
            assert wait_for(lambda: answered(server, 499) == 1, timeout=10), "the event loop was blocked"
            started = time.monotonic()
            health = httpx.get(f"{server.base_url}/health", timeout=10)
            assert health.status_code == 200 and time.monotonic() - started < 5
            assert server.balance_of(key) < Decimal("1")  # not refunded yet: the lock holds it
    finally:
        sock.close()
    assert wait_for(lambda: server.balance_of(key) == Decimal("1"), timeout=60), "the refund was dropped"
    assert wait_for(lambda: open_reservations(server) == 0)
    assert audit_exit_code(server) == 0


FULL_DISK = "SELECT RAISE(ABORT, 'database or disk is full')"


def test_a_database_that_refuses_writes_mid_request_gives_json_and_the_refund_lands_later(
    server: LiveServer,
) -> None:
    key = server.key("1")
    transformer = server.app.state.serving.queue.generator.pipe.transformer

    def out_of_memory(*_: object) -> NoReturn:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    # The generation fails, and so does every write of its failure path: the job's status and the refund.
    execute(
        server,
        f"CREATE TRIGGER full_jobs BEFORE UPDATE ON jobs BEGIN {FULL_DISK}; END",
        "CREATE TRIGGER full_refunds BEFORE UPDATE ON charges WHEN NEW.status = 'refunded' "
        f"BEGIN {FULL_DISK}; END",
    )
    handle = transformer.register_forward_pre_hook(out_of_memory)
    try:
        failed = server.post({"prompt": "doomed", **SMALL}, key=key)
    finally:
        handle.remove()
    assert failed.status_code == 500 and failed.headers["content-type"] == "application/json"
    assert "no credits were charged" in failed.json()["error"]
    assert server.balance_of(key) < Decimal("1")  # the database still refuses the refund
    execute(server, "DROP TRIGGER full_jobs", "DROP TRIGGER full_refunds")  # space is freed
    assert wait_for(lambda: server.balance_of(key) == Decimal("1"), timeout=30), "the refund was dropped"
    assert [job.status for job in jobs_of(server)] == ["FAILED"]
    assert audit_exit_code(server) == 0

    # A write refused at admission: nothing is charged, and the answer is JSON too.
    execute(server, f"CREATE TRIGGER full_keys BEFORE UPDATE ON api_keys BEGIN {FULL_DISK}; END")
    refused = server.post({"prompt": "no room", **SMALL}, key=key)
    execute(server, "DROP TRIGGER full_keys")
    assert refused.status_code == 503 and refused.headers["content-type"] == "application/json"
    assert "database" in refused.json()["error"] and refused.headers["retry-after"]
    assert server.balance_of(key) == Decimal("1")


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
    ledger = Ledger(migrated(f"sqlite:///{tmp_path / 'ledger.sqlite3'}"))
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


# -- shutdown -----------------------------------------------------------------------------------


@pytest.mark.slow  # a child sd3-server process: start-up and model load
def test_sigterm_keeps_accepted_v2_jobs_for_the_next_start(
    tmp_path: Path, data_dir: Path, tiny_dir: Path
) -> None:
    server = ServerProcess(data_dir=data_dir, database=tmp_path / "ledger.sqlite3")
    ledger = Ledger(migrated(server.database_url))
    _, key = ledger.create_key(name="patient", credits=Decimal(1))
    headers = {"x-api-key": key}
    store = JobStore(ledger.engine)
    server.start()
    slow = {
        "prompt": "survivor",
        "img_width": 1024,
        "img_height": 1024,
        "num_inference_steps": 30,
        "seed": 5,
    }
    running = httpx.post(f"{server.base_url}/v2/{SLUG}", json=slow, headers=headers).json()
    waiting = httpx.post(
        f"{server.base_url}/v2/{SLUG}", json={**slow, "num_inference_steps": 10}, headers=headers
    ).json()
    try:
        assert wait_for(
            lambda: httpx.get(running["status_url"], headers=headers).json()["status"] == "PROCESSING"
        )
        server.stop()  # SIGTERM: a graceful shutdown (uvicorn re-raises the signal once it is done)
        for job in (running, waiting):
            record = store.get(job["request_id"])
            assert record is not None and record.status == "QUEUED", record
            assert ledger.charge(job["request_id"]) == "reserved"  # still paid for, not refunded
        server.start()
        for job in (running, waiting):
            assert wait_for(job_status_is(job["status_url"], "COMPLETED", headers), timeout=240)
        # Both jobs ran to completion after the restart and were charged once each.
        assert ledger.list_keys()[0].balance == Decimal(1) - Decimal("0.0468") - Decimal("0.0156")
        assert all(row.ok and row.open_reservations == 0 for row in ledger.audit())
    finally:
        server.stop()
        ledger.close()


# -- the queue ----------------------------------------------------------------------------------


class Blocker:
    """Holds the device on a first job until released, so that others wait behind it."""

    def __init__(self, generator: SD3Generator) -> None:
        self.generator = generator
        self.started = threading.Event()
        self.release = threading.Event()

    def generate_batch(
        self, requests: list[GenerationRequest], *, callback: StepCallback | None = None
    ) -> list[GenerationResult]:
        if requests[0].prompt == "block":
            self.started.set()
            self.release.wait(30)
        return self.generator.generate_batch(requests, callback=callback)

    def count_tokens(self, text: str) -> int:
        return self.generator.count_tokens(text)


def test_jobs_whose_waiters_left_log_no_unretrieved_future_errors(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    assert isinstance(runtime.generator, SD3Generator)
    blocker = Blocker(runtime.generator)
    queue = WorkQueue(blocker, batch_key=batch_key, max_pending=16, retry_after_s=1)
    small = GenerationRequest(prompt="", width=512, height=512, steps=10)

    async def scenario() -> None:
        first = asyncio.create_task(queue.submit(replace(small, prompt="block", seed=0)))
        await asyncio.to_thread(blocker.started.wait, 30)
        gone = [
            asyncio.create_task(queue.submit(replace(small, prompt=f"gone {i}", seed=i))) for i in range(3)
        ]
        await asyncio.sleep(0)  # they are queued
        for task in gone:
            task.cancel()
        await asyncio.gather(*gone, return_exceptions=True)
        blocker.release.set()
        await first
        # The device skips the cancelled jobs and resolves their futures, which nobody awaits now.
        assert await asyncio.to_thread(queue.join, 30)
        await asyncio.sleep(0)  # the deliveries scheduled before `pending` dropped

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        try:
            asyncio.run(scenario())
        finally:
            queue.shutdown()
        gc.collect()  # an unretrieved exception is logged when its future is collected
    assert not [record for record in caplog.records if "never retrieved" in record.getMessage()]
