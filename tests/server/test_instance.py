"""Instance identity: made once per data folder, whatever the port; old `<host>:<port>` rows are
adopted only where their owner is provably gone."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.config import INSTANCE_ID_FILE, Settings, stored_instance_id
from server.instance import adopt_legacy_rows
from server.job_store import JobStore
from server.ledger import Ledger
from tests.databases import migrated

HOST = socket.gethostname()


def test_the_default_id_is_made_once_per_data_folder_and_ignores_the_port(tmp_path: Path) -> None:
    first = Settings(data_dir=tmp_path, port=8000).resolved_instance_id
    assert first.startswith(f"{HOST[:64]}-") and ":" not in first
    assert Settings(data_dir=tmp_path, port=9000).resolved_instance_id == first
    assert (tmp_path / INSTANCE_ID_FILE).read_text().strip() == first
    assert Settings(data_dir=tmp_path / "other").resolved_instance_id != first
    assert Settings(data_dir=tmp_path, instance_id="mine").resolved_instance_id == "mine"
    with pytest.raises(ValidationError):
        Settings(instance_id="x" * 129)  # the ledger's owner columns hold 128 characters


def test_processes_making_the_id_at_once_agree_on_one(tmp_path: Path) -> None:
    attempts = 8
    barrier = threading.Barrier(attempts)
    made: list[str] = []

    def make() -> None:
        barrier.wait()
        made.append(stored_instance_id(tmp_path))

    threads = [threading.Thread(target=make) for _ in range(attempts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(made) == attempts and len(set(made)) == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == [INSTANCE_ID_FILE]  # no scratch file left


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[Ledger, JobStore]]:
    ledger = Ledger(migrated(f"sqlite:///{tmp_path / 'data' / 'ledger.sqlite3'}"))
    yield ledger, JobStore(ledger.engine)
    ledger.close()


def leave_open_work(ledger: Ledger, jobs: JobStore, owner: str, request_id: str) -> None:
    """A v2 job accepted by `owner` and never finished: reserved credits and a QUEUED row."""
    keys = {key.name: key for key in ledger.list_keys()}
    record = keys["k"] if "k" in keys else ledger.create_key(name="k", credits=Decimal(1))[0]
    ledger.reserve(key_id=record.id, amount=Decimal("0.01"), request_id=request_id, owner=owner)
    jobs.create(
        request_id=request_id,
        key_id=record.id,
        surface="v2",
        model="m",
        params={},
        cost=Decimal("0.01"),
        owner=owner,
    )


def owners(ledger: Ledger, jobs: JobStore, request_ids: list[str]) -> list[str]:
    found = []
    for request_id in request_ids:
        job = jobs.get(request_id)
        assert job is not None
        found.append(job.owner)
    return found


def test_old_host_and_port_rows_in_the_data_folder_ledger_are_adopted(
    tmp_path: Path, stores: tuple[Ledger, JobStore]
) -> None:
    ledger, jobs = stores
    for owner, request_id in [
        (f"{HOST}:8000", "old-a"),
        (f"{HOST}:8001", "old-b"),
        ("elsewhere:8000", "other-host"),
        (f"{HOST}:not-a-port", "not-legacy"),
    ]:
        leave_open_work(ledger, jobs, owner, request_id)
    settings = Settings(data_dir=tmp_path / "data")  # the default ledger: SQLite in the data folder
    me = settings.resolved_instance_id
    assert adopt_legacy_rows(settings, ledger.engine, owner=me) == [f"{HOST}:8000", f"{HOST}:8001"]
    assert owners(ledger, jobs, ["old-a", "old-b", "other-host", "not-legacy"]) == [
        me,
        me,
        "elsewhere:8000",
        f"{HOST}:not-a-port",
    ]
    assert [job.request_id for job in jobs.pending(owner=me, surface="v2")] == ["old-a", "old-b"]
    assert ledger.abandoned(me, keep={"old-a"}) == ["old-b"]  # the reservations moved too
    assert adopt_legacy_rows(settings, ledger.engine, owner=me) == []  # once


@pytest.mark.parametrize("setting", ["ledger_elsewhere", "instance_id"])
def test_old_rows_are_left_alone_where_their_owner_may_still_run(
    tmp_path: Path, stores: tuple[Ledger, JobStore], setting: str
) -> None:
    # A ledger outside the data folder (PostgreSQL, or a SQLite file another folder's server may
    # use) can be shared by a live server of the old release on another port; an explicit
    # SD3_INSTANCE_ID never changed with the port, so nothing of the operator's is orphaned.
    ledger, jobs = stores
    leave_open_work(ledger, jobs, f"{HOST}:8000", "old")
    if setting == "ledger_elsewhere":
        settings = Settings(data_dir=tmp_path / "other", database_url=str(ledger.engine.url))
    else:
        settings = Settings(data_dir=tmp_path / "data", instance_id="chosen")
    assert adopt_legacy_rows(settings, ledger.engine, owner=settings.resolved_instance_id) == []
    assert owners(ledger, jobs, ["old"]) == [f"{HOST}:8000"]
    assert ledger.charge("old") == "reserved"


HOLD = """
import sys, time
from pathlib import Path
from server.instance_lock import instance_lock
with instance_lock(Path(sys.argv[1]), sys.argv[2], listening="http://127.0.0.1:8000"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_old_rows_of_a_server_still_holding_its_lock_are_left_alone(
    tmp_path: Path, stores: tuple[Ledger, JobStore]
) -> None:
    # A release with the instance lock but the port-based id, still running on this data folder.
    ledger, jobs = stores
    leave_open_work(ledger, jobs, f"{HOST}:8000", "alive")
    leave_open_work(ledger, jobs, f"{HOST}:8001", "gone")
    folder = tmp_path / "data"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder), f"{HOST}:8000"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        settings = Settings(data_dir=folder)
        me = settings.resolved_instance_id
        assert adopt_legacy_rows(settings, ledger.engine, owner=me) == [f"{HOST}:8001"]
        assert owners(ledger, jobs, ["alive", "gone"]) == [f"{HOST}:8000", me]
    finally:
        holder.kill()
        holder.communicate()  # waits, and closes the pipe (ResourceWarning otherwise)
