"""Several models as several servers on one ledger (docs/scale-out.md, Several models): one key works
on every server, each answers its own family's slugs and names the others' as not served here, and a
v2 job is polled through any of them. The reverse proxy that routes slugs in front is not tested."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from server.config import Settings
from server.schemas import SLUG
from tests.live import LiveServer, twin_server_at, wait_for

LARGE = "stable-diffusion-3.5-large-txt2img"


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory, settings: Settings
) -> Iterator[tuple[LiveServer, LiveServer]]:
    shared = tmp_path_factory.mktemp("shared-ledger") / "ledger.sqlite3"
    url = f"sqlite:///{shared}"
    medium = twin_server_at(
        settings, url, tmp_path_factory.mktemp("medium"), "tiny:sd3-medium", instance_id="sd3-medium-1"
    )
    large = twin_server_at(
        settings, url, tmp_path_factory.mktemp("large"), "tiny:sd3.5-large", instance_id="sd35-large-1"
    )
    try:
        yield next(medium), next(large)
    finally:
        medium.close()
        large.close()


def test_one_key_pays_on_every_model_and_each_answers_only_its_slugs(
    pair: tuple[LiveServer, LiveServer],
) -> None:
    medium, large = pair
    key = medium.key("1")  # created through one server's ledger: both read the same books
    ok_medium = medium.post(
        {"prompt": "a fox", "img_width": 512, "img_height": 512, "num_inference_steps": 10}, key=key
    )
    ok_large = large.post(
        {"prompt": "a fox", "steps": 10, "width": 64, "height": 64}, key=key, path=f"/v1/{LARGE}"
    )
    assert ok_medium.status_code == ok_large.status_code == 200
    assert float(ok_large.headers["x-remaining-credits"]) == float(large.balance_of(key))
    assert medium.balance_of(key) == large.balance_of(key) < 1
    for server, slug, runs in ((medium, LARGE, "sd3-medium"), (large, SLUG, "sd3.5-large")):
        refused = server.post({"prompt": "a fox"}, key=key, path=f"/v1/{slug}")
        assert refused.status_code == 404 and f"this server runs {runs}" in refused.json()["error"]


def test_a_job_submitted_to_one_model_is_polled_through_another(pair: tuple[LiveServer, LiveServer]) -> None:
    medium, large = pair
    key = large.key("1")
    headers = {"x-api-key": key}
    submitted = large.post(
        {"prompt": "a fox", "steps": 10, "width": 64, "height": 64}, key=key, path=f"/v2/{LARGE}"
    )
    assert submitted.status_code == 200, submitted.text
    request_id = submitted.json()["request_id"]
    through_medium = f"{medium.base_url}/v2/requests/{request_id}/status"
    assert wait_for(lambda: httpx.get(through_medium, headers=headers).json()["status"] == "COMPLETED", 120)
    result = httpx.get(f"{medium.base_url}/v2/requests/{request_id}", headers=headers).json()
    assert result["status"] == "COMPLETED" and result["metrics"]["cost"] > 0
