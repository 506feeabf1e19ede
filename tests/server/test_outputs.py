"""The output store and `GET /v1/outputs/<id>.jpg`: capability URLs that expire."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from server.outputs import OutputStore
from tests.live import LiveServer


def jpeg(width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


# Ids that must never reach the file system: traversal, separators, other shapes and cases.
BAD_IDS = [
    "",
    "..",
    "../ledger.sqlite3",
    "..%2Fledger",
    "/etc/passwd",
    "a" * 31,
    "a" * 33,
    "A" * 32,
    "g" * 32,
    "0" * 31 + "\x00",
    "0" * 32 + "/",
    "0" * 32 + ".jpg",
    " " + "0" * 31,
]


def test_save_writes_the_bytes_under_a_random_id(tmp_path: Path) -> None:
    store = OutputStore(tmp_path / "outputs", retention_s=60)
    data = jpeg()
    first = store.save(data, owner_key_id=1)
    second = store.save(data, owner_key_id=1)
    assert first != second
    assert len(first) == 32 and int(first, 16) >= 0
    path = store.path(first)
    assert path == tmp_path / "outputs" / f"{first}.jpg"
    assert path.read_bytes() == data
    # Written by rename: no temporary file is left next to the outputs.
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == sorted(
        [f"{first}.jpg", f"{second}.jpg"]
    )


def test_default_retention_is_seven_days(tmp_path: Path) -> None:
    assert OutputStore(tmp_path).retention_s == 7 * 24 * 3600


def test_an_unknown_id_has_no_path(tmp_path: Path) -> None:
    assert OutputStore(tmp_path).path("0" * 32) is None


@pytest.mark.parametrize("output_id", BAD_IDS)
def test_a_malformed_id_has_no_path_even_if_such_a_file_exists(tmp_path: Path, output_id: str) -> None:
    store = OutputStore(tmp_path / "outputs")
    (tmp_path / "ledger.sqlite3").write_bytes(b"secret")
    assert store.path(output_id) is None


def test_an_expired_output_is_not_served_and_purge_removes_only_expired_ones(tmp_path: Path) -> None:
    store = OutputStore(tmp_path, retention_s=60)
    old = store.save(jpeg(), owner_key_id=1)
    fresh = store.save(jpeg(), owner_key_id=1)
    old_path = store.path(old)
    assert old_path is not None
    age(old_path, 61)
    assert store.path(old) is None
    assert store.path(fresh) is not None
    assert store.purge_expired() == 1
    assert not old_path.exists()
    assert store.path(fresh) is not None
    assert store.purge_expired() == 0


def test_a_retention_below_one_second_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="retention_s"):
        OutputStore(tmp_path, retention_s=0)


# -- over HTTP ------------------------------------------------------------------------------------


def live_store(live: LiveServer) -> OutputStore:
    store = live.app.state.outputs
    assert isinstance(store, OutputStore)
    return store


def test_an_output_is_served_as_jpeg_without_a_key(live: LiveServer) -> None:
    data = jpeg(80, 56)
    output_id = live_store(live).save(data, owner_key_id=1)
    response = httpx.get(f"{live.base_url}/v1/outputs/{output_id}.jpg")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert response.content == data
    assert Image.open(io.BytesIO(response.content)).size == (80, 56)


def test_an_expired_output_is_a_json_404(live: LiveServer) -> None:
    store = live_store(live)
    output_id = store.save(jpeg(), owner_key_id=1)
    path = store.path(output_id)
    assert path is not None
    age(path, store.retention_s + 5)
    response = httpx.get(f"{live.base_url}/v1/outputs/{output_id}.jpg")
    assert response.status_code == 404
    assert "error" in response.json()


@pytest.mark.parametrize(
    "tail",
    [
        "0" * 32 + ".jpg",  # well-formed, never saved
        "..%2F..%2Fledger.sqlite3.jpg",
        "%2e%2e%2fledger.jpg",
        "..%5cledger.jpg",
        "A" * 32 + ".jpg",
        "0" * 32 + ".png",
        "0" * 32,
    ],
)
def test_unknown_or_malformed_output_urls_are_json_404s(live: LiveServer, tail: str) -> None:
    # Planted where a traversal would land: it must never be served.
    (live.settings.data_dir / "ledger.jpg").write_bytes(jpeg())
    response = httpx.get(f"{live.base_url}/v1/outputs/{tail}")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/json")
    assert "error" in response.json()
