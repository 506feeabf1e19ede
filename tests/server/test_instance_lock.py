"""The data-folder lock that keeps a second server from recovering the first one's work."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from server.instance_lock import InstanceBusy, instance_lock

HOLD = """
import sys, time
from pathlib import Path
from server.instance_lock import instance_lock
with instance_lock(Path(sys.argv[1]), "host:8000", listening="http://127.0.0.1:8000"):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(data_dir: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(data_dir)], stdout=subprocess.PIPE, text=True, cwd=Path.cwd()
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    return process


def test_a_second_holder_is_refused_with_a_sentence_naming_the_first(tmp_path: Path) -> None:
    first = _holder(tmp_path)
    try:
        with pytest.raises(InstanceBusy) as refused, instance_lock(tmp_path, "host:8000", listening="x"):
            pass
        message = str(refused.value)
        assert f"pid {first.pid}" in message and "http://127.0.0.1:8000" in message
        assert str(tmp_path) in message and "SD3_INSTANCE_ID" in message
        # Another identity on the same folder (a Ray replica) is not excluded.
        with instance_lock(tmp_path, "host:8000/replica-1", listening="x"):
            pass
    finally:
        first.kill()
        first.communicate()  # waits, and closes the pipe (ResourceWarning otherwise)


def test_a_killed_holder_leaves_nothing_that_blocks_its_successor(tmp_path: Path) -> None:
    first = _holder(tmp_path)
    first.send_signal(signal.SIGKILL)
    first.communicate()  # waits, and closes the pipe (ResourceWarning otherwise)
    with instance_lock(tmp_path, "host:8000", listening="x"):
        pass
