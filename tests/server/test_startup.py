"""Start-up with a data folder or ledger that cannot be written: one sentence and exit 2, no traceback.

The tests run as root, for whom permission bits stop nothing, so the failures are ones root meets
too: a data folder whose path runs through a regular file (mkdir: "Not a directory"), and a ledger
path that is a directory (SQLite: "unable to open database file").
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from server.cli import app

runner = CliRunner()
# `serve` configures logging onto CliRunner's stream, which is closed after each invoke.
pytestmark = pytest.mark.usefixtures("restored_logging")
# The real command, as an operator runs it (and as the kill -9 tests start it).
SD3_SERVER = str(Path(sys.executable).with_name("sd3-server"))


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # A server that did start would never return: the timeout turns that into a failure, not a hang.
    return subprocess.run(
        [SD3_SERVER, "serve", "--model", "tiny", "--port", "0", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line(text: str) -> str:
    return " ".join(text.split())  # the console wraps long sentences at its width


def test_serve_with_a_data_folder_under_a_regular_file_exits_2_in_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    data_dir = tmp_path / "a-file" / "sd3-data"
    result = serve("--data-dir", str(data_dir))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    message = one_line(result.stderr)
    assert f"Cannot write to the data folder {data_dir} (Not a directory)" in message
    assert "point --data-dir (SD3_DATA_DIR) at a folder this user can write." in message


@pytest.mark.slow
def test_serve_with_a_ledger_that_is_a_directory_exits_2_in_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "ledger.sqlite3").mkdir()  # the default ledger's place in the data folder
    result = serve(env={"SD3_DATA_DIR": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    message = one_line(result.stderr)
    assert f"The ledger database {tmp_path / 'ledger.sqlite3'} is not a file" in message
    assert "point --data-dir (SD3_DATA_DIR) at a SQLite file." in message


def test_key_commands_with_a_ledger_that_is_a_directory_exit_2_in_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "ledger").mkdir()
    url = f"sqlite:///{tmp_path / 'ledger'}"
    for command in (
        ["keys", "list"],
        ["keys", "create", "--name", "a"],
        ["credits", "audit"],
        ["db", "upgrade"],
    ):
        result = runner.invoke(app, [*command, "--database-url", url])
        assert result.exit_code == 2, (command, result.output, result.exception)
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert "point --database-url (SD3_DATABASE_URL) at a SQLite file." in one_line(result.output)


def test_key_commands_with_a_ledger_under_a_regular_file_exit_2_in_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    result = runner.invoke(app, ["keys", "list", "--data-dir", str(tmp_path / "a-file" / "data")])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Cannot write to the ledger's folder" in one_line(result.output)
