"""Where sd3-server writes: the data folder and the SQLite ledger, checked before anything starts.

A folder that cannot be written (a read-only mount, a path under a regular file, a ledger path
that is a directory) otherwise surfaces deep inside model loading or the app's lifespan as a
traceback. These checks turn it into one sentence naming the path and the setting to change
(docs/reliability.md, "Connections and start-up"). They write and delete one empty temporary file:
permission bits alone say nothing for root, a read-only file system says no to everyone.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from server.config import Settings
from server.db.engine import sqlite_path


class StorageUnusable(Exception):
    """The data folder or the ledger file cannot be used; the message is one sentence for people."""


def check_data_dir(settings: Settings) -> None:
    """The data folder (models, outputs and the default ledger) exists or can be made, and is writable."""
    _check_folder(settings.data_dir, what="the data folder", change="--data-dir (SD3_DATA_DIR)")


def check_database_path(settings: Settings) -> None:
    """A SQLite ledger's folder is writable (SQLite writes its -wal and -shm there) and the file a file."""
    path = sqlite_path(settings.resolved_database_url)
    if path is None:
        return  # a database server, a SQLite URI, or a form the ledger refuses with its own message
    change = "--database-url (SD3_DATABASE_URL)" if settings.database_url else "--data-dir (SD3_DATA_DIR)"
    _check_folder(path.parent, what="the ledger's folder", change=change)
    if path.exists() and not path.is_file():
        raise StorageUnusable(f"The ledger database {path} is not a file: point {change} at a SQLite file.")


def _check_folder(folder: Path, *, what: str, change: str) -> None:
    folder = folder.expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not folder.is_dir():  # mkdir's exist_ok accepts an existing path only when it is a folder
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        with tempfile.TemporaryFile(dir=folder, prefix=".sd3-write-check-"):
            pass
    except OSError as exc:
        # mkdir says "File exists" for a regular file in the folder's place.
        reason = "a file, not a folder" if isinstance(exc, FileExistsError) else exc.strerror or str(exc)
        raise StorageUnusable(
            f"Cannot write to {what} {folder} ({reason}): point {change} at a folder this user can write."
        ) from None
