"""Nothing lost, nothing double-spent: disconnects, crashes, limits, odd input, the audit."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import NoReturn

import httpx
import pytest
import torch
from typer.testing import CliRunner

from server.cli import app as cli
from server.config import Settings
from server.ledger import Ledger
from server.runtime import Runtime
from tests.databases import migrated
from tests.live import SLUG, SMALL, LiveServer, ServerProcess, live_server, wait_for

SLOW = {"prompt": "slow", "img_width": 1024, "img_height": 1024, "num_inference_steps": 100}


@pytest.fixture(scope="module")
def limited(
    settings: Settings, runtime: Runtime, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    db = tmp_path_factory.mktemp("limited") / "ledger.sqlite3"
    custom = settings.model_copy(
        update={
            "database_url": f"sqlite:///{db}",
            "limits": settings.limits.model_copy(update={"requests_per_minute": 2, "max_body_bytes": 4096}),
            "cors_origins": ["https://studio.example"],
        }
    )
    yield from live_server(custom, runtime)


def test_a_client_that_disconnects_has_its_job_cancelled_and_refunded(live: LiveServer) -> None:
    key = live.key("1")
    queue = live.app.state.serving.queue
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.base_url}/v1/{SLUG}", json=SLOW, headers={"x-api-key": key}, timeout=1.0)
    # The 100-step job stops early instead of running to the end, and the credits come back.
    assert wait_for(lambda: queue.pending == 0, timeout=10)
    assert wait_for(lambda: live.balance_of(key) == Decimal("1"))
    assert live.post({"prompt": "after", **SMALL}, key=key).status_code == 200


def test_a_simulated_cuda_oom_is_500_refunded_and_the_next_request_works(live: LiveServer) -> None:
    key = live.key("1")
    transformer = live.app.state.serving.queue.generator.pipe.transformer

    def out_of_memory(*_: object) -> NoReturn:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    handle = transformer.register_forward_pre_hook(out_of_memory)
    try:
        failed = live.post({"prompt": "oom", **SMALL}, key=key)
    finally:
        handle.remove()
    assert failed.status_code == 500 and "out of memory" not in failed.text.lower()
    assert live.balance_of(key) == Decimal("1")
    assert live.post({"prompt": "fine", **SMALL}, key=key).status_code == 200


def test_bodies_over_the_limit_are_413(limited: LiveServer) -> None:
    key = limited.key()
    big = {"prompt": "x" * 5000}
    response = limited.post(big, key=key)
    assert response.status_code == 413 and "too large" in response.json()["error"]

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    chunked = httpx.post(
        f"{limited.base_url}/v1/{SLUG}",
        content=chunks(),
        headers={"x-api-key": key, "content-type": "application/json"},
    )
    assert chunked.status_code == 413 and chunked.json()["error"].startswith("Request body too large")
    assert limited.balance_of(key) == Decimal("10")


def test_the_per_key_rate_limit_is_429_with_its_headers(limited: LiveServer) -> None:
    key, other = limited.key(), limited.key()
    first = limited.post({"prompt": "a", **SMALL}, key=key)
    assert first.status_code == 200 and first.headers["x-rate-limit-remaining"] == "1"
    assert first.headers["x-rate-limit-reset-at-utc"].endswith("Z")
    assert limited.post({"prompt": "b", **SMALL}, key=key).status_code == 200
    third = limited.post({"prompt": "c", **SMALL}, key=key)
    assert third.status_code == 429 and "limit is 2 per minute" in third.json()["error"]
    assert int(third.headers["retry-after"]) >= 1 and third.headers["x-rate-limit-remaining"] == "0"
    assert limited.balance_of(key) == Decimal("10") - 2 * Decimal("0.0039")
    assert limited.post({"prompt": "d", **SMALL}, key=other).status_code == 200  # per key


def test_cors_is_closed_by_default_and_open_to_configured_origins(
    live: LiveServer, limited: LiveServer
) -> None:
    preflight = {
        "origin": "https://studio.example",
        "access-control-request-method": "POST",
        "access-control-request-headers": "x-api-key,content-type",
    }
    closed = httpx.options(f"{live.base_url}/v1/{SLUG}", headers=preflight)
    assert "access-control-allow-origin" not in closed.headers
    opened = httpx.options(f"{limited.base_url}/v1/{SLUG}", headers=preflight)
    assert opened.headers["access-control-allow-origin"] == "https://studio.example"
    evil = httpx.options(
        f"{limited.base_url}/v1/{SLUG}", headers={**preflight, "origin": "https://evil.example"}
    )
    assert evil.headers.get("access-control-allow-origin") != "https://evil.example"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_422(live: LiveServer, literal: str) -> None:
    key = live.key()
    body = '{"prompt": "x", "guidance_scale": ' + literal + "}"
    response = httpx.post(
        f"{live.base_url}/v1/{SLUG}",
        content=body,
        headers={"x-api-key": key, "content-type": "application/json"},
    )
    assert response.status_code == 422
    assert response.json()["error"].startswith("guidance_scale: Input should be a finite number")


def test_unicode_prompts_work(live: LiveServer) -> None:
    response = live.post({"prompt": "一只熊猫 🐼 — «astronaute» Ωμέγα", **SMALL}, key=live.key())
    assert response.status_code == 200


def test_credits_audit_finds_every_balance_equal_to_grants_minus_charges(live: LiveServer) -> None:
    url = live.settings.resolved_database_url
    result = CliRunner().invoke(cli, ["credits", "audit", "--database-url", url])
    assert result.exit_code == 0, result.output
    # A balance changed behind the ledger's back is caught.
    ledger = Ledger(url)
    _, key = ledger.create_key(name="tampered", credits=Decimal(1))
    with ledger._engine.begin() as conn:  # noqa: SLF001 - simulating outside tampering
        conn.exec_driver_sql("UPDATE api_keys SET balance_micro = balance_micro + 5 WHERE name = 'tampered'")
    result = CliRunner().invoke(cli, ["credits", "audit", "--database-url", url])
    assert result.exit_code == 1 and "tampered" in result.output
    with ledger._engine.begin() as conn:  # noqa: SLF001
        conn.exec_driver_sql("UPDATE api_keys SET balance_micro = balance_micro - 5 WHERE name = 'tampered'")


@pytest.mark.slow  # a child sd3-server process: start-up and model load
def test_kill_9_during_generation_loses_no_credits(tmp_path: Path, data_dir: Path, tiny_dir: Path) -> None:
    server = ServerProcess(data_dir=data_dir, database=tmp_path / "ledger.sqlite3")
    ledger = Ledger(migrated(server.database_url))
    _, key = ledger.create_key(name="victim", credits=Decimal(1))

    def balance() -> Decimal:
        return ledger.list_keys()[0].balance

    server.start()
    errors: list[Exception] = []

    def doomed_request() -> None:
        try:
            httpx.post(f"{server.base_url}/v1/{SLUG}", json=SLOW, headers={"x-api-key": key}, timeout=60)
        except httpx.HTTPError as exc:
            errors.append(exc)

    client = threading.Thread(target=doomed_request)
    client.start()
    try:
        assert wait_for(lambda: balance() < Decimal(1)), "the request was never debited"
        server.kill_9()  # mid-generation: no refund can run in that process
        client.join(30)
        assert errors and balance() == Decimal(1) - Decimal("0.156")  # still reserved
        server.start()
        assert balance() == Decimal(1)  # refunded by the new process before it served anything
        assert all(row.ok and row.open_reservations == 0 for row in ledger.audit())
    finally:
        server.stop()
