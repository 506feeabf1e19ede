"""A test's database, brought to the current schema as a process's start-up does (server/db/migrations).

The repositories no longer upgrade the database they open: a test that builds a `Ledger` on a new
database, before or without a server, upgrades it first, as `serve` and the CLI do.
"""

from __future__ import annotations

from server.db.migrations import upgrade_to_head


def migrated(url: str) -> str:
    """`url`, once its database is at the head revision."""
    upgrade_to_head(url)
    return url
