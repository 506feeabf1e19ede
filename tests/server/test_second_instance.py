"""A second `serve` on a data folder in use exits at once and touches nothing of the first's work.

The scenario of issue 12: the first server runs a long v1 request and holds a queued v2 job; a
second `sd3-server serve` on the same data folder and port used to run start-up recovery first —
refunding the first one's in-flight charge and re-queuing its job — and only then fail to bind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from server.job_store import JobStore
from server.keys import hash_key
from server.ledger import Ledger
from tests.databases import migrated
from tests.live import SLUG, ServerProcess, wait_for

SD3_SERVER = str(Path(sys.executable).with_name("sd3-server"))


@pytest.mark.slow  # a child sd3-server process: start-up and model load
def test_a_second_server_on_the_same_folder_exits_at_once_and_the_first_finishes_its_work(
    tmp_path: Path, data_dir: Path, tiny_dir: Path
) -> None:
    first = ServerProcess(data_dir=data_dir, database=tmp_path / "ledger.sqlite3")
    ledger = Ledger(migrated(first.database_url))
    _, key = ledger.create_key(name="busy", credits=Decimal(1))
    headers = {"x-api-key": key}
    store = JobStore(ledger.engine)
    first.start()
    # Long enough to be still running when a second server would have finished loading and recovering.
    long_v1 = {"prompt": "long", "img_width": 1536, "img_height": 1536, "num_inference_steps": 100}
    answers: list[httpx.Response] = []
    v1 = threading.Thread(
        target=lambda: answers.append(
            httpx.post(f"{first.base_url}/v1/{SLUG}", json=long_v1, headers=headers, timeout=600)
        )
    )
    try:
        v1.start()
        small = {"prompt": "queued", "num_inference_steps": 10}
        queued = httpx.post(f"{first.base_url}/v2/{SLUG}", json=small, headers=headers).json()
        assert wait_for(lambda: ledger.audit()[0].open_reservations == 2)
        env = {**os.environ, "SD3_DATA_DIR": str(data_dir), "SD3_DATABASE_URL": first.database_url}
        started = time.monotonic()
        second = subprocess.run(
            [SD3_SERVER, "serve", "--model", "tiny", "--port", str(first.port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        # At once: before any model is loaded, and with a sentence that names the other server.
        assert second.returncode == 2, second.stderr
        assert time.monotonic() - started < 60
        message = " ".join(second.stderr.split())
        assert first.process is not None
        assert f"pid {first.process.pid}" in message and "in use by another sd3-server" in message
        v1.join(600)
        assert answers and answers[0].status_code == 200, answers[0].text if answers else "no answer"
        assert answers[0].headers["content-type"] == "image/jpeg"
        job = queued["request_id"]
        assert wait_for(lambda: getattr(store.get(job), "status", None) == "COMPLETED", timeout=240)
        # Nothing of the first server's was refunded from under it: both charges were settled by it.
        for request_id in (answers[0].headers["x-request-id"], job):
            assert ledger.charge(request_id) == "settled"
        assert all(row.ok and row.open_reservations == 0 for row in ledger.audit())
    finally:
        first.stop()
        v1.join(5)
        ledger.close()


@pytest.mark.slow  # a child sd3-server process: start-up and model load
def test_the_starter_key_is_printed_on_the_first_start_only(tmp_path: Path, tiny_dir: Path) -> None:
    env = {**os.environ, "SD3_DATA_DIR": str(tmp_path), "SD3_MODEL__ID": "tiny"}
    # The tiny model is built once per data folder: point this one at the session's copy.
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-sd3").symlink_to(tiny_dir, target_is_directory=True)
    printed = []
    for _ in range(2):
        server = ServerProcess(data_dir=tmp_path, database=tmp_path / "ledger.sqlite3")
        process = subprocess.Popen(
            [SD3_SERVER, "serve", "--port", str(server.port), "--starter-key"],
            env={**env, "SD3_DATABASE_URL": server.database_url},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        server.process = process
        try:
            assert wait_for(server.answers, timeout=90), "the server did not start"
        finally:
            server.stop()
        out, err = process.communicate(timeout=30)
        printed.append((out.strip(), " ".join(err.split())))
    (first_out, first_err), (second_out, second_err) = printed
    assert first_out.startswith("sd3_") and "shown this once" in first_err
    assert f"Ledger: {tmp_path / 'ledger.sqlite3'}" in first_err
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    try:
        # The printed key is the ledger's one key, and only its hash was stored.
        record = ledger.find_by_hash(hash_key(first_out))
        assert record is not None and record.name == "starter" and record.balance == Decimal(100)
        assert len(ledger.list_keys()) == 1
    finally:
        ledger.close()
    assert second_out == "" and "sd3_" not in second_err and "keys create" in second_err
