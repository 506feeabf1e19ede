"""One live server per identity and data folder: an OS lock taken before anything is recovered.

At start-up a server refunds the reservations and re-queues the v2 jobs recorded under its instance
id, on the ground that it is their owner and was stopped. That is only true when no other process
with the same identity is still running: a second `serve` on the same data folder would otherwise
refund the first one's in-flight charges and re-run its jobs under its feet. So `serve` takes an
exclusive lock first and holds it for its whole life. The operating system releases it when the
process ends, however it ends (kill -9 included), so a crashed server never blocks its successor.

The lock is an advisory `flock` on a file in the data folder (via `filelock`), one per instance id:
Ray replicas sharing a data folder have ids of their own and do not exclude each other. Beside it,
the holder writes a line describing itself, so that the refused process can name it.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout


class InstanceBusy(Exception):
    """Another live process holds this identity on this data folder; the message says which."""


def _paths(data_dir: Path, instance_id: str) -> tuple[Path, Path]:
    # Instance ids may hold ':' or '/', which file names cannot.
    name = hashlib.sha256(instance_id.encode()).hexdigest()[:16]
    folder = data_dir / "locks"
    return folder / f"instance-{name}.lock", folder / f"instance-{name}.holder"


@contextmanager
def instance_lock(data_dir: Path, instance_id: str, *, listening: str) -> Iterator[None]:
    """Hold the lock of `instance_id` on `data_dir` for the block; `InstanceBusy` if it is taken."""
    lock_path, holder_path = _paths(data_dir, instance_id)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    # timeout=0: a second server must exit at once, not wait for the first one to stop.
    lock = FileLock(lock_path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = holder_path.read_text().strip()
        except OSError:
            holder = "another process"
        raise InstanceBusy(
            f"The data folder {data_dir} is in use by another sd3-server ({holder}) with the same "
            f"instance id {instance_id!r}: stop that one first, or give this one its own --data-dir "
            "(SD3_DATA_DIR) or SD3_INSTANCE_ID."
        ) from None
    try:
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        holder_path.write_text(f"pid {os.getpid()} on {socket.gethostname()}, {listening}, since {started}\n")
        yield
    finally:
        lock.release()
