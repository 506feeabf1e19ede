"""Adopting what an older release left open under its default identity, `<host name>:<port>`.

Releases before the data folder's `instance-id` file (server/config.py) named a server by host and
port, so a restart on another port, or after this upgrade, would leave that name's v2 jobs and
reservations to no one. Taking them over is only safe when their owner is provably gone: two live
servers on one host with different ports may share a PostgreSQL ledger, and adopting the other's
rows would refund or re-run its work under its feet. So rows are adopted only when

- the instance id is the default one (an operator who set `SD3_INSTANCE_ID` keeps it across ports
  and upgrades, and nothing of theirs is orphaned), and
- the ledger is a SQLite file inside the data folder, which one server uses at a time: a server that
  wrote `<this host>:<port>` into it is this folder's previous server, stopped now; and
- no live process holds that old id's instance lock on this folder (server/instance_lock.py; releases
  that take it hold it while they run). The locks are held while the rows move, so a server with the
  old id cannot start meanwhile.

Elsewhere (PostgreSQL, a SQLite file outside the data folder) the operator starts the server once
with `SD3_INSTANCE_ID=<host>:<old port>` to recover them (docs/reliability.md).
"""

from __future__ import annotations

import logging
import re
import socket
from contextlib import ExitStack

from sqlalchemy import Engine, select, update
from sqlalchemy.engine import make_url

from server.config import Settings
from server.db.engine import sqlite_path
from server.db.tables import charges, jobs
from server.instance_lock import InstanceBusy, instance_lock
from server.job_store import PENDING

log = logging.getLogger(__name__)


def adopts_legacy_rows(settings: Settings) -> bool:
    """Whether this server may take over rows left under the old `<host>:<port>` default (see above)."""
    if settings.instance_id is not None:
        return False
    path = sqlite_path(settings.resolved_database_url)
    # Only a plain file URL, as the default ledger's is; one with options was set up by hand.
    if path is None or make_url(settings.resolved_database_url).query:
        return False
    return path.resolve().is_relative_to(settings.data_dir.resolve())


def legacy_owners(owners: set[str]) -> list[str]:
    """The owners among `owners` that are this host's old default identity, `<host name>:<port>`."""
    pattern = re.compile(rf"{re.escape(socket.gethostname())}:[0-9]{{1,5}}")
    return sorted(owner for owner in owners if pattern.fullmatch(owner))


def adopt_legacy_rows(settings: Settings, engine: Engine, *, owner: str) -> list[str]:
    """Move open reservations and unfinished jobs of the old default identity to `owner`.

    Called at start-up before `Serving.recover`, which then resumes or refunds them as its own.
    One transaction, so a crash leaves either every row moved or none. Returns the adopted owners.
    """
    if not adopts_legacy_rows(settings):
        return []
    with ExitStack() as held, engine.begin() as conn:
        found = set(
            conn.execute(select(charges.c.owner).where(charges.c.status == "reserved").distinct()).scalars()
        )
        found |= set(
            conn.execute(select(jobs.c.owner).where(jobs.c.status.in_(PENDING)).distinct()).scalars()
        )
        legacy = []
        for candidate in legacy_owners(found):
            try:
                held.enter_context(
                    instance_lock(
                        settings.data_dir, candidate, listening=f"adopting its open work as {owner}"
                    )
                )
            except InstanceBusy:
                log.warning("not adopting the open work of %s: a server with that id is running", candidate)
                continue
            legacy.append(candidate)
        if legacy:
            conn.execute(
                update(charges)
                .where(charges.c.owner.in_(legacy), charges.c.status == "reserved")
                .values(owner=owner)
            )
            conn.execute(
                update(jobs).where(jobs.c.owner.in_(legacy), jobs.c.status.in_(PENDING)).values(owner=owner)
            )
    if legacy:
        log.warning("adopted the open work of %s, this data folder's previous identity", ", ".join(legacy))
    return legacy
