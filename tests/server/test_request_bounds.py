"""Request bounds over real HTTP: the prompt token limit, pricing by model evaluations, and a prompt
cache that one key cannot probe for another's prompts (docs/reliability.md, Request bounds)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from decimal import Decimal

import httpx
import numpy as np
import pytest
from PIL import Image

from pipelines.request import GenerationRequest
from pipelines.sd3 import SD3Generator
from server.config import Settings
from server.runtime import Runtime
from tests.live import SMALL, LiveServer, live_server

LIMIT = 40


@pytest.fixture(scope="module")
def bounded(
    settings: Settings, runtime: Runtime, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    db = tmp_path_factory.mktemp("bounded") / "ledger.sqlite3"
    custom = settings.model_copy(
        update={
            "database_url": f"sqlite:///{db}",
            "limits": settings.limits.model_copy(update={"max_prompt_tokens": LIMIT}),
            "pricing": settings.pricing.model_copy(update={"mode": "evaluations"}),
        }
    )
    yield from live_server(custom, runtime)


@pytest.fixture(scope="module")
def generator(runtime: Runtime) -> SD3Generator:
    assert isinstance(runtime.generator, SD3Generator)
    return runtime.generator


def history_of(server: LiveServer, key: str) -> list[dict]:
    response = httpx.get(f"{server.base_url}/v1/history", headers={"x-api-key": key})
    assert response.status_code == 200
    return response.json()["items"]


# -- the token limit ----------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_prompt_over_the_token_limit_is_422_before_anything_is_reserved(
    bounded: LiveServer, generator: SD3Generator, field: str
) -> None:
    # The tiny model's CLIP tokenizer makes one token per character, the weights syntax none.
    at_limit, over = "x" * LIMIT, "(" + "x" * (LIMIT + 1) + ":1.2)"
    assert generator.count_tokens(at_limit) == LIMIT and generator.count_tokens(over) == LIMIT + 1
    key = bounded.key()
    refused = bounded.post({"prompt": "a cat", **SMALL, field: over}, key=key)
    assert refused.status_code == 422, refused.text
    message = refused.json()["error"]
    assert message.startswith(f"{field}:") and f"{LIMIT + 1} CLIP tokens" in message and str(LIMIT) in message
    assert bounded.balance_of(key) == Decimal("10") and history_of(bounded, key) == []
    assert bounded.post({"prompt": "a cat", **SMALL, field: at_limit}, key=key).status_code == 200


def test_the_token_limit_applies_to_v2_jobs_too(bounded: LiveServer) -> None:
    key = bounded.key()
    response = bounded.post(
        {"prompt": "x" * (LIMIT + 1), **SMALL}, key=key, path="/v2/stable-diffusion-3-medium-txt2img"
    )
    assert response.status_code == 422 and "CLIP tokens" in response.json()["error"]
    assert bounded.balance_of(key) == Decimal("10") and history_of(bounded, key) == []


def test_the_default_token_limit_refuses_a_few_thousand_emoji(
    live: LiveServer, generator: SD3Generator
) -> None:
    # 1,100 characters, well under the 4,000-character bound, but 4 byte-level tokens each.
    emoji = "🐼" * 1100
    assert generator.count_tokens(emoji) > live.settings.limits.max_prompt_tokens == 1000
    key = live.key()
    response = live.post({"prompt": "a panda", "negative_prompt": emoji, **SMALL}, key=key)
    assert response.status_code == 422 and "limit of 1000" in response.json()["error"]
    assert live.balance_of(key) == Decimal("10")


# -- pricing by evaluations ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "cost"),
    [
        ({"scheduler": "Euler"}, "0.0039"),  # 10 evaluations × 2 forwards: the reference rate
        ({"scheduler": "DPM++ 2M"}, "0.0039"),
        ({"scheduler": "Heun"}, "0.00741"),  # 19 evaluations
        ({"scheduler": "DPM++ SDE"}, "0.00741"),
        ({"scheduler": "Euler", "guidance_scale": 1}, "0.00195"),  # no negative pass
    ],
)
def test_priced_by_evaluations_a_request_costs_the_work_it_runs(
    bounded: LiveServer, body: dict, cost: str
) -> None:
    key = bounded.key()
    response = bounded.post({"prompt": "a cat", **SMALL, **body}, key=key)
    assert response.status_code == 200, response.text
    assert Decimal(response.headers["x-cost"]) == Decimal(cost)
    assert bounded.balance_of(key) == Decimal("10") - Decimal(cost)


def test_priced_by_evaluations_an_img2img_request_counts_the_schedule_and_strength_it_runs(
    bounded: LiveServer,
) -> None:
    # ddim_uniform at 30 steps runs 31 at full strength (ComfyUI's rounding) and 30 below it, as
    # KSampler's denoise keeps the last 30 steps of a longer schedule; euler's own, sgm_uniform, 30.
    def ran(schedule: str, strength: float) -> int:
        request = GenerationRequest(
            prompt="", scheduler="euler", schedule=schedule, steps=30, denoise=strength, init_image=pixels
        )
        return len(request.sigmas()) - 1

    pixels = np.full((256, 256, 3), 128, np.uint8)
    cases = [("ddim_uniform", 1.0), ("ddim_uniform", 0.5), ("sgm_uniform", 1.0)]
    assert [ran(*case) for case in cases] == [31, 30, 30]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    costs = {}
    for schedule, strength in cases:
        fields = {"sampler": "euler", "scheduler": schedule, "num_inference_steps": 30, "strength": strength}
        key = bounded.key()
        response = bounded.post(
            {"image": image, "prompt": "a cat", **fields}, key=key, path="/v1/sd3-med-img2img"
        )
        assert response.status_code == 200, response.text
        costs[schedule, strength] = Decimal(response.headers["x-cost"])
        assert bounded.balance_of(key) == Decimal("10") - costs[schedule, strength]
    # 0.008 a 1024² image at 20 steps × 2 forwards; 256² is 1/16 of that; every step 2 forwards.
    assert costs == {
        ("ddim_uniform", 1.0): Decimal("0.000775"),
        ("ddim_uniform", 0.5): Decimal("0.00075"),
        ("sgm_uniform", 1.0): Decimal("0.00075"),
    }


def test_by_default_every_sampler_costs_the_hosted_price(live: LiveServer) -> None:
    response = live.post({"prompt": "a cat", **SMALL, "scheduler": "Heun"}, key=live.key())
    assert Decimal(response.headers["x-cost"]) == Decimal("0.0039")


# -- the prompt cache ---------------------------------------------------------------------------
def test_one_keys_cached_prompt_is_not_reused_for_another_key(
    live: LiveServer, generator: SD3Generator
) -> None:
    cache = generator.prompt_cache
    first, second = live.key(), live.key()
    body = {"prompt": "a prompt only the first key knows", **SMALL}
    assert live.post(body, key=first).status_code == 200  # encodes the prompt; the empty negative may hit
    misses = cache.misses
    assert live.post(body, key=first).status_code == 200
    assert cache.misses == misses  # the same key: served from the cache
    assert live.post(body, key=second).status_code == 200
    assert cache.misses == misses + 1  # another key: encoded again, so its timing reveals nothing
    assert live.post(body, key=second).status_code == 200
    assert cache.misses == misses + 1  # and then cached for that key


def test_the_empty_negative_prompt_is_shared_across_keys(generator: SD3Generator) -> None:
    shared = generator.encode("", scope="key:1")
    assert generator.encode("", scope="key:2") is shared
    assert generator.encode("a cat", scope="key:1") is not generator.encode("a cat", scope="key:2")
