"""Operations: readiness, Prometheus metrics, request ids in headers and logs, the admin API."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from server.config import Settings
from server.db.migrations import upgrade_to_head
from server.keys import hash_key
from server.logs import configure_logging
from server.runtime import Runtime
from tests.live import SLUG, SMALL, LiveServer, live_server, wait_for

ADMIN = "s3cret-admin-token"


@pytest.fixture(scope="module")
def admin_live(
    settings: Settings, runtime: Runtime, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    db = tmp_path_factory.mktemp("admin") / "ledger.sqlite3"
    yield from live_server(
        settings.model_copy(update={"database_url": f"sqlite:///{db}", "admin_token": SecretStr(ADMIN)}),
        runtime,
    )


def samples(base_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{base_url}/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_ready_reports_the_queue(live: LiveServer) -> None:
    response = httpx.get(f"{live.base_url}/ready")
    assert response.status_code == 200
    body = response.json()
    assert body["ready"] is True and body["queue"]["max_pending"] == live.settings.queue.max_pending


def test_metrics_count_requests_generations_images_and_credits(live: LiveServer) -> None:
    before = samples(live.base_url)
    key = live.key()
    assert live.post({"prompt": "metered", "samples": 2, **SMALL}, key=key).status_code == 200
    assert live.post({"prompt": "x", "img_width": 3}, key=key).status_code == 422
    after = samples(live.base_url)

    def delta(name: str, **labels: str) -> float:
        index = (name, tuple(sorted(labels.items())))
        return after.get(index, 0.0) - before.get(index, 0.0)

    route = f"/v1/{SLUG}"
    assert delta("sd3_http_requests_total", route=route, method="POST", status="200") == 1
    assert delta("sd3_http_requests_total", route=route, method="POST", status="422") == 1
    assert delta("sd3_images_generated_total") == 2
    assert delta("sd3_credits_charged_total") == pytest.approx(0.0078)
    assert delta("sd3_generations_total", outcome="completed") == 1
    assert delta("sd3_generation_seconds_count") == 1
    assert ("sd3_queue_depth", ()) in after
    # Unknown paths share one label instead of one per path.
    httpx.get(f"{live.base_url}/no/such/{key[:8]}")
    labels = [dict(labels) for (name, labels) in samples(live.base_url) if name == "sd3_http_requests_total"]
    assert not any(key[:8] in label.get("route", "") for label in labels)


def test_every_response_carries_a_request_id_that_names_the_charge(live: LiveServer) -> None:
    key = live.key()
    ok = live.post({"prompt": "traced", **SMALL}, key=key, headers={"x-request-id": "client-chosen"})
    failed = live.post({}, key=key)
    missing = httpx.get(f"{live.base_url}/nothing")
    ids = [r.headers["x-request-id"] for r in (ok, failed, missing)]
    assert len(set(ids)) == 3 and "client-chosen" not in ids
    history = httpx.get(f"{live.base_url}/v1/history", headers={"x-api-key": key}).json()["items"]
    assert history[0]["request_id"] == ok.headers["x-request-id"]


def test_logs_are_json_lines_with_the_request_id_and_never_the_key(
    live: LiveServer, restored_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(level="info", fmt="json")
    key = live.key()
    response = live.post({"prompt": "logged", **SMALL}, key=key)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("logger") == "sd3.access" and line.get("status") == 200]
    assert access, lines
    mine = [line for line in access if line.get("request_id") == response.headers["x-request-id"]]
    assert mine and mine[0]["path"] == f"/v1/{SLUG}" and mine[0]["key"].startswith("test-")
    assert key not in json.dumps(lines)


def test_admin_api_needs_the_token(admin_live: LiveServer, live: LiveServer) -> None:
    url = f"{admin_live.base_url}/admin/keys"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"authorization": "Bearer wrong"}).status_code == 401
    user_key = admin_live.key()
    assert httpx.get(url, headers={"authorization": f"Bearer {user_key}"}).status_code == 401
    assert httpx.get(f"{live.base_url}/admin/keys").status_code == 404  # no token configured: no API


def test_admin_api_manages_keys_and_credits(admin_live: LiveServer) -> None:
    headers = {"authorization": f"Bearer {ADMIN}"}
    base = f"{admin_live.base_url}/admin"
    created = httpx.post(f"{base}/keys", json={"name": "ops-made", "credits": "2.5"}, headers=headers)
    assert created.status_code == 200 and created.json()["credits"] == "2.5"
    key = created.json()["key"]
    assert admin_live.balance_of(key) == Decimal("2.5")
    assert httpx.post(f"{base}/keys", json={"name": "ops-made"}, headers=headers).status_code == 422
    listed = httpx.get(f"{base}/keys", headers=headers).json()["keys"]
    assert any(row["name"] == "ops-made" and "key" not in row for row in listed)
    added = httpx.post(f"{base}/keys/ops-made/credits", json={"amount": "1.25"}, headers=headers)
    assert added.json()["credits"] == "3.75"
    assert (
        httpx.post(f"{base}/keys/ops-made/credits", json={"amount": "-1"}, headers=headers).status_code == 422
    )
    assert httpx.post(f"{base}/keys/ops-made/disable", headers=headers).status_code == 200
    assert admin_live.post({"prompt": "x", **SMALL}, key=key).status_code == 401
    assert httpx.post(f"{base}/keys/ops-made/enable", headers=headers).status_code == 200
    assert admin_live.post({"prompt": "x", **SMALL}, key=key).status_code == 200
    assert httpx.post(f"{base}/keys/nobody/disable", headers=headers).status_code == 404
    audit = httpx.get(f"{base}/audit", headers=headers).json()
    assert audit["ok"] is True and any(row["name"] == "ops-made" for row in audit["keys"])


def test_the_docs_pages_load_every_asset_from_the_server_itself(live: LiveServer) -> None:
    # A self-hosted server often runs without internet: /docs must not depend on a CDN.
    for page in ("/docs", "/redoc"):
        html = httpx.get(f"{live.base_url}{page}").text
        assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html) + re.findall(r"url: *'([^']+)'", html)
        assert assets, html
        for asset in assets:
            assert asset.startswith("/"), f"{page} loads {asset} from elsewhere"
            assert httpx.get(f"{live.base_url}{asset}").status_code == 200, asset


def test_the_schema_lists_the_admin_routes_only_when_the_admin_api_exists(
    live: LiveServer, admin_live: LiveServer
) -> None:
    def admin_paths(server: LiveServer) -> list[str]:
        paths = httpx.get(f"{server.base_url}/openapi.json").json()["paths"]
        return [path for path in paths if path.startswith("/admin")]

    assert admin_paths(live) == []
    assert "/admin/keys" in admin_paths(admin_live)


def test_auto_log_format_is_text_on_a_terminal_and_json_elsewhere(
    restored_logging: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A real pseudo-terminal stands for the operator's terminal.
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        configure_logging(level="info", fmt="auto")
        logging.getLogger("sd3.test").info("hello terminal")
        terminal.flush()
        seen = os.read(leader, 4096).decode()
    os.close(leader)
    assert "hello terminal" in seen and not seen.lstrip().startswith("{")
    monkeypatch.undo()
    configure_logging(level="info", fmt="auto")  # captured standard error is not a terminal
    logging.getLogger("sd3.test").info("hello pipe")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert json.loads(line)["event"] == "hello pipe"


def test_alembic_does_not_narrate_the_schema_check(
    restored_logging: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(level="info", fmt="json")
    upgrade_to_head(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    assert "alembic" not in capsys.readouterr().err


def test_admin_api_refuses_a_huge_exponent_at_once_and_stays_responsive(admin_live: LiveServer) -> None:
    headers = {"authorization": f"Bearer {ADMIN}"}
    base = f"{admin_live.base_url}/admin"
    # Before the bound, this request held the GIL for minutes: timeout=10 is "not frozen", generously.
    huge = httpx.post(
        f"{base}/keys", json={"name": "huge", "credits": "1e999999999"}, headers=headers, timeout=10
    )
    assert huge.status_code == 422 and huge.json()["error"].startswith("credits: a credit amount is at most")
    assert httpx.get(f"{admin_live.base_url}/health", timeout=10).status_code == 200
    tiny = httpx.post(
        f"{base}/keys", json={"name": "tiny", "credits": "1e-999999999"}, headers=headers, timeout=10
    )
    assert tiny.status_code == 422 and "decimals" in tiny.json()["error"]
    listed = httpx.get(f"{base}/keys", headers=headers).json()["keys"]
    assert not {"huge", "tiny"} & {row["name"] for row in listed}


def test_admin_grants_past_the_maximum_balance_are_422(admin_live: LiveServer) -> None:
    headers = {"authorization": f"Bearer {ADMIN}"}
    base = f"{admin_live.base_url}/admin"
    created = httpx.post(f"{base}/keys", json={"name": "whale", "credits": "600000000"}, headers=headers)
    assert created.status_code == 200
    refused = httpx.post(f"{base}/keys/whale/credits", json={"amount": "600000000"}, headers=headers)
    assert refused.status_code == 422 and "maximum of 1000000000" in refused.json()["error"]
    assert (
        httpx.post(f"{base}/keys/whale/credits", json={"amount": "9e12"}, headers=headers).status_code == 422
    )
    audit = httpx.get(f"{base}/audit", headers=headers).json()
    assert audit["ok"] is True
    assert [row["credits"] for row in audit["keys"] if row["name"] == "whale"] == ["600000000"]


@pytest.mark.parametrize("name", ["team/a", "team/a/disable", "acme[prod]", "50% off", "ünï cödé"])
def test_admin_api_manages_keys_whatever_their_name(admin_live: LiveServer, name: str) -> None:
    headers = {"authorization": f"Bearer {ADMIN}"}
    base = f"{admin_live.base_url}/admin"
    created = httpx.post(f"{base}/keys", json={"name": name, "credits": "1"}, headers=headers)
    assert created.status_code == 200 and created.json()["name"] == name
    key = created.json()["key"]
    # A client percent-encodes the name (what a URL cannot carry as is); a "/" may also stay as is.
    encoded = quote(name, safe="")
    disabled = httpx.post(f"{base}/keys/{encoded}/disable", headers=headers)
    assert disabled.status_code == 200 and disabled.json() == {"name": name, "enabled": False}
    assert admin_live.post({"prompt": "x", **SMALL}, key=key).status_code == 401
    assert httpx.post(f"{base}/keys/{quote(name)}/enable", headers=headers).status_code == 200
    added = httpx.post(f"{base}/keys/{encoded}/credits", json={"amount": "2"}, headers=headers)
    assert added.status_code == 200 and added.json() == {"name": name, "credits": "3"}
    assert admin_live.balance_of(key) == Decimal(3)


def test_admin_api_refuses_control_characters_in_a_new_name(admin_live: LiveServer) -> None:
    headers = {"authorization": f"Bearer {ADMIN}"}
    response = httpx.post(f"{admin_live.base_url}/admin/keys", json={"name": "a\nb"}, headers=headers)
    assert response.status_code == 422 and "control characters" in response.json()["error"]


def test_a_client_that_goes_away_is_one_info_line_with_its_own_request_id(
    live: LiveServer, restored_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    key = live.key("1")
    record = live.ledger.find_by_hash(hash_key(key))
    assert record is not None
    configure_logging(level="info", fmt="json")
    slow = {"prompt": "gone", "img_width": 1024, "img_height": 1024, "num_inference_steps": 100}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.base_url}/v1/{SLUG}", json=slow, headers={"x-api-key": key}, timeout=1.0)
    assert wait_for(lambda: live.balance_of(key) == Decimal("1"))  # cancelled and refunded
    [job] = live.app.state.serving.jobs.history(record.id, limit=5)
    captured: list[str] = []

    def logged_its_end() -> bool:
        captured.append(capsys.readouterr().err)
        return '"status": 499' in "".join(captured)

    assert wait_for(logged_its_end, timeout=30)
    captured.append(capsys.readouterr().err)
    lines = [json.loads(line) for line in "".join(captured).splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("request_id") == job.request_id]
    assert [line.get("status") for line in mine if line.get("logger") == "sd3.access"] == [499]
    assert not [line for line in lines if line.get("level") in ("error", "critical")], lines
    assert not [line for line in lines if "never retrieved" in json.dumps(line)]


def test_torchaos_import_does_not_narrate_kernels_it_could_not_load() -> None:
    # diffusers imports torchao wherever it is installed; a fresh process, since this one has.
    pytest.importorskip("torchao")
    script = "import sys\nfrom server.logs import configure_logging\n"
    script += "configure_logging(level=sys.argv[1], fmt='json')\nimport torchao\n"
    script += "import logging\nlogging.getLogger('torchao').error('an error still shows')\n"
    quiet, loud = (
        subprocess.run([sys.executable, "-c", script, level], capture_output=True, text=True, check=True)
        for level in ("info", "debug")
    )
    (line,) = quiet.stderr.strip().splitlines()
    assert json.loads(line)["event"] == "an error still shows" and json.loads(line)["level"] == "error"
    # At debug nothing is held back: the torchao lines this hides are there again, wherever it has any.
    assert "an error still shows" in loud.stderr
