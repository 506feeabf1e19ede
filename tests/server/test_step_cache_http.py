"""The opt-in step cache over HTTP: a request's `cache` field, the server's default, and bad values."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from pipelines import step_cache
from server.config import Settings
from server.runtime import Runtime
from server.schemas import SD35LargeRequest
from server.serving import sd35_generation_request
from tests.live import SMALL, LiveServer, live_server
from tests.server.test_img2img_http import PATH as IMG2IMG
from tests.server.test_img2img_http import body as img2img_body

BODY = {"prompt": "a lighthouse at dusk", "seed": 7, **SMALL}


@pytest.fixture(autouse=True)
def reuse_whatever_moved(monkeypatch: pytest.MonkeyPatch) -> None:
    # Random weights move too much between steps for the real thresholds to skip anything: make
    # "faster" reuse whatever moved, so that a cached image differs from the exact one.
    policy = step_cache.StepCachePolicy(threshold=float("inf"))
    monkeypatch.setitem(step_cache.LEVELS, "faster", policy)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_a_request_opts_in_and_pays_the_same_price(live: LiveServer) -> None:
    key = live.key()
    exact = live.post(BODY, key=key)
    after_exact = live.balance_of(key)
    cached = live.post({**BODY, "cache": "faster"}, key=key)
    assert exact.status_code == cached.status_code == 200
    assert 10 - after_exact == after_exact - live.balance_of(key) > 0
    assert np.abs(pixels(cached.content) - pixels(exact.content)).max() > 0
    explicit_off = live.post({**BODY, "cache": "off"}, key=key)
    assert np.array_equal(pixels(explicit_off.content), pixels(exact.content))


def test_img2img_takes_the_field_too(live: LiveServer) -> None:
    key = live.key()
    exact = live.post(img2img_body(seed=3, num_inference_steps=12, strength=1.0), key=key, path=IMG2IMG)
    cached = live.post(
        img2img_body(seed=3, num_inference_steps=12, strength=1.0, cache="faster"), key=key, path=IMG2IMG
    )
    assert exact.status_code == cached.status_code == 200
    assert np.abs(pixels(cached.content) - pixels(exact.content)).max() > 0


@pytest.mark.parametrize("value", ["warp", 3, ""])
def test_an_unknown_level_is_a_422_that_charges_nothing(live: LiveServer, value: object) -> None:
    key = live.key("1")
    response = live.post({**BODY, "cache": value}, key=key)
    assert response.status_code == 422
    assert "cache" in response.json()["error"]
    assert live.balance_of(key) == 1


@pytest.fixture(scope="module")
def cached_by_default(settings: Settings, runtime: Runtime) -> Iterator[LiveServer]:
    with_default = settings.model_copy(
        update={"performance": settings.performance.model_copy(update={"step_cache": "faster"})}
    )
    yield from live_server(with_default, runtime)


def test_the_server_default_applies_to_requests_that_name_none(
    live: LiveServer, cached_by_default: LiveServer
) -> None:
    exact = live.post(BODY, key=live.key())
    default = cached_by_default.post(BODY, key=cached_by_default.key())
    named = live.post({**BODY, "cache": "faster"}, key=live.key())
    off = cached_by_default.post({**BODY, "cache": "off"}, key=cached_by_default.key())
    assert np.array_equal(pixels(default.content), pixels(named.content))
    assert np.array_equal(pixels(off.content), pixels(exact.content))


def test_sd35_bodies_carry_the_field_to_the_generator() -> None:
    body = SD35LargeRequest.model_validate({"prompt": "x", "cache": "fast"})
    assert sd35_generation_request(body, seed=1, negative_window=False).step_cache == "fast"
    plain = SD35LargeRequest.model_validate({"prompt": "x"})
    job = sd35_generation_request(plain, seed=1, negative_window=False, step_cache="faster")
    assert job.step_cache == "faster"
