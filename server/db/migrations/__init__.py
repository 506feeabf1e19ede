"""Schema migrations (Alembic), run from code so that an installed package needs no repo checkout.

The tables in `server/db/tables.py` are the source of truth; the revisions in `versions/` are frozen
copies that reach the same schema step by step, and `tests/server/test_migrations.py` checks that
they agree (Alembic's autogenerate finds no difference). Nothing here imports a repository.

Each process's start-up upgrades the database to the latest revision once, before it builds a
repository: the app's lifespan (`serve`, and each Ray replica's app), a Ray replica before it settles
what dead replicas left, and the CLI's commands that touch the database; `sd3-server db upgrade`
does it by hand. The repositories only check that it was done. Several processes may start at once
on a new database, so the upgrade runs in one transaction that first takes a database-wide lock: a
PostgreSQL advisory lock, or SQLite's write lock (`BEGIN IMMEDIATE`). The others wait for it, then
find the database at the head revision and do nothing. DDL is transactional on both, so a failed
upgrade leaves the database as it was.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DatabaseError

from server.db.engine import create_database_engine, sqlite_path

MIGRATIONS_DIR = Path(__file__).resolve().parent
# Any constant 64-bit number unique among the advisory locks of applications sharing the database;
# these are the bytes of "sd3-migr".
ADVISORY_LOCK_KEY = 0x7364_332D_6D69_6772
# The lock makes concurrent start-ups safe; these retries are a second line of defence for a SQLite
# lock wait that ran past its busy timeout under heavy load.
UPGRADE_ATTEMPTS = 3


@dataclass(frozen=True)
class SchemaStatus:
    current: str | None  # None: the database has never been migrated (new, or made by create_all)
    head: str

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head


def alembic_config() -> Config:
    """An Alembic configuration without an ini file: the scripts are found next to this module."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Silences Alembic's warning about the separator of `version_locations`, which we do not use.
    config.set_main_option("path_separator", "os")
    # "v0002_add_x.py": a file name that is also a module name, so mypy and ruff check revisions too.
    config.set_main_option("file_template", "v%%(rev)s_%%(slug)s")
    return config


class SchemaNotCurrent(RuntimeError):
    """A repository was opened on a database that start-up has not upgraded to this release's schema."""


@cache
def _scripts() -> ScriptDirectory:
    # Read once per process: the revisions are files of the installed package, fixed while it runs.
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    head = _scripts().get_current_head()
    assert head is not None, "server/db/migrations/versions holds no revision"
    return head


def schema_status(engine_or_url: Engine | str) -> SchemaStatus:
    """Where the database stands; reads only (a SQLite file that does not exist is not created)."""
    if isinstance(engine_or_url, str):
        path = sqlite_path(engine_or_url)
        if path is not None and not path.exists():
            return SchemaStatus(current=None, head=head_revision())
    with _engine(engine_or_url) as engine, engine.connect() as conn:
        return SchemaStatus(current=_current_revision(conn), head=head_revision())


def require_current_schema(engine: Engine) -> None:
    """Raise `SchemaNotCurrent`, saying what to run, unless the database is at the head revision."""
    status = schema_status(engine)
    if not status.up_to_date:
        raise SchemaNotCurrent(
            f"the database is at schema revision {status.current or 'none'}, and this sd3-server needs "
            f"{status.head}: run `sd3-server db upgrade`, or start the server, which upgrades it"
        )


def upgrade_to_head(engine_or_url: Engine | str) -> SchemaStatus:
    """Bring the database to the latest revision; a no-op (and no lock) when it is there already.

    A database made by the code before migrations existed (`metadata.create_all`) has our tables but
    no `alembic_version`: revision 0001 adopts it, creating only what is missing, and nothing is lost.
    """
    for attempt in range(UPGRADE_ATTEMPTS):
        try:
            return _upgrade(engine_or_url)
        except DatabaseError:
            if attempt == UPGRADE_ATTEMPTS - 1:
                raise
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable: the last attempt returns or raises")


def _upgrade(engine_or_url: Engine | str) -> SchemaStatus:
    head = head_revision()
    with _engine(engine_or_url) as engine:
        with engine.connect() as conn:
            current = _current_revision(conn)
        # The common case, every start-up after the first: one read, no write lock taken.
        if current == head:
            return SchemaStatus(current=head, head=head)
        if current is not None and current not in _known_revisions():
            # A newer release migrated this database (a rolling deploy, or a downgraded package): this
            # code does not know that schema, and Alembic's own message ("Can't locate revision") hides why.
            raise RuntimeError(
                f"the database is at schema revision {current}, which this sd3-server ({head} at most) does "
                "not know: run the newer sd3-server, or restore a backup taken before it migrated"
            )
        with engine.connect() as conn, conn.begin():
            lock_for_migrations(conn)
            config = alembic_config()
            # env.py runs the migrations on this connection, inside this transaction and this lock;
            # whoever held the lock before us has already upgraded, and Alembic then finds nothing to do.
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
            current = _current_revision(conn)
    return SchemaStatus(current=current, head=head)


def autogenerate_revision(engine_or_url: Engine | str, message: str) -> None:
    """Write a new revision into versions/ from the difference between the tables and a database.

    For developers, in a checkout: upgrade a scratch database to head, change a table definition,
    then call this and review the file it writes before committing it.
    """
    with _engine(engine_or_url) as engine, engine.connect() as conn:
        config = alembic_config()
        config.attributes["connection"] = conn
        # Sequential ids ("0002" after "0001") read better in `db current` than random hex.
        next_id = f"{int(head_revision()) + 1:04d}"
        command.revision(config, message=message, autogenerate=True, rev_id=next_id)


def lock_for_migrations(conn: Connection) -> None:
    """Take the database-wide migration lock, held until `conn`'s transaction ends."""
    backend = conn.dialect.name
    if backend == "postgresql":
        # Held until this transaction ends; a second process blocks here rather than racing us
        # between "is the table there?" and CREATE TABLE.
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
    elif backend == "sqlite":
        driver_connection = conn.connection.driver_connection
        # Python's sqlite3 starts no transaction before DDL, so without this every CREATE would commit
        # on its own; IMMEDIATE also takes the write lock now, and others wait on the busy timeout.
        if driver_connection is not None and not driver_connection.in_transaction:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
    # Other backends are not supported by the ledger; they run without a lock.


def _known_revisions() -> set[str]:
    return {script.revision for script in _scripts().walk_revisions()}


def _current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def _engine(engine_or_url: Engine | str) -> Iterator[Engine]:
    if isinstance(engine_or_url, Engine):
        yield engine_or_url
        return
    engine = create_database_engine(engine_or_url, wal_and_foreign_keys=False)
    try:
        yield engine
    finally:
        engine.dispose()
