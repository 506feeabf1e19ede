"""The v1 contract over real HTTP: answers, headers, every error code, and what is charged."""

from __future__ import annotations

import base64
import gzip
import io
import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from pipelines.request import GenerationRequest
from schedulers.names import public_names
from server.config import Settings
from server.keys import hash_key
from server.runtime import Runtime
from server.schemas import Txt2ImgRequest
from tests.live import SLUG, SMALL, LiveServer, live_server

# The example request of the hosted model page, copied verbatim from the page's JavaScript snippet.
HOSTED_PAGE_REQUEST = Path(__file__).resolve().parents[1] / "data" / "hosted_page_request.json"


def original_request() -> dict:
    return json.loads(HOSTED_PAGE_REQUEST.read_text())


def jpeg(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    image.load()
    return image


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(jpeg(data), dtype=np.float32)


@pytest.mark.slow
def test_original_request_returns_a_jpeg_of_the_asked_size_and_charges_its_price(live: LiveServer) -> None:
    key = live.key("1")
    body = original_request()
    assert body["img_width"] == 1024 and body["scheduler"] == "DPM++ 2M" and body["base64"] is False
    response = live.post(body, key=key)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    assert jpeg(response.content).size == (1024, 1024)
    assert response.headers["x-cost"] == "0.039"
    assert Decimal(response.headers["x-remaining-credits"]) == Decimal("0.961") == live.balance_of(key)
    assert response.headers["x-seed-value"] == response.headers["x-seed"] == "468685"
    assert response.headers["x-request-id"]
    assert float(response.headers["x-generation-time"]) > 0


def test_base64_answer_is_json_with_the_image(live: LiveServer) -> None:
    key = live.key()
    response = live.post({"prompt": "a red fox", "base64": True, "seed": 3, **SMALL}, key=key)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    payload = response.json()
    assert set(payload) == {"image"}
    assert jpeg(base64.b64decode(payload["image"])).size == (512, 512)
    assert "x-remaining-credits" in response.headers


@pytest.mark.parametrize("as_base64", [False, True])
def test_several_samples_come_back_as_a_json_list_in_batch_order(live: LiveServer, as_base64: bool) -> None:
    key = live.key()
    response = live.post(
        {"prompt": "a red fox", "samples": 3, "seed": 5, "base64": as_base64, **SMALL}, key=key
    )
    assert response.status_code == 200
    payload = response.json()
    images = [base64.b64decode(item) for item in payload["images"]]
    assert len(images) == 3 and payload["image"] == payload["images"][0]
    assert all(jpeg(data).size == (512, 512) for data in images)
    assert len(set(images)) == 3  # one noise draw for the batch: the samples differ
    # Three images at 512x512, 10 steps: 0.039 * 3 * 0.4 * 0.25
    assert response.headers["x-cost"] == "0.0117"
    # Item 0 of a batch is the single image of the same seed (docs/sampling.md §7): equal up to the
    # float rounding of a different batch size, far from the other items of the batch.
    single = pixels(live.post({"prompt": "a red fox", "seed": 5, **SMALL}, key=key).content)
    assert np.abs(single - pixels(images[0])).mean() < 1.0
    assert np.abs(single - pixels(images[1])).mean() > 5.0


def test_same_seed_gives_the_same_image_and_another_seed_another(live: LiveServer) -> None:
    key = live.key()
    body = {"prompt": "a lighthouse", "seed": 42, **SMALL}
    first, again = live.post(body, key=key), live.post(body, key=key)
    other = live.post({**body, "seed": 43}, key=key)
    assert first.status_code == again.status_code == other.status_code == 200
    assert first.content == again.content
    assert first.content != other.content


def test_random_seed_is_reported_and_replays_the_image(live: LiveServer) -> None:
    key = live.key()
    first = live.post({"prompt": "a lighthouse", **SMALL}, key=key)  # seed defaults to -1
    seed = int(first.headers["x-seed"])
    assert 0 <= seed <= 999_999_999_999_999
    replay = live.post({"prompt": "a lighthouse", "seed": seed, **SMALL}, key=key)
    assert replay.content == first.content


def test_numbers_and_booleans_sent_as_strings_and_nulls_are_accepted(live: LiveServer) -> None:
    key = live.key()
    body = {
        "prompt": "a boat",
        "num_inference_steps": "10",
        "seed": "7",
        "base64": "False",
        "img_width": "512",
        "img_height": 512,
        "negative_prompt": None,
        "scheduler": "euler",
        "unknown_field_of_another_model": 1,
    }
    response = live.post(body, key=key)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"


def test_the_slug_is_also_served_at_the_root(live: LiveServer) -> None:
    response = live.post({"prompt": "a boat", **SMALL}, key=live.key(), path=f"/{SLUG}")
    assert response.status_code == 200


# -- errors: a JSON {"error": ...} body, the right code, and nothing charged ---------------------


def assert_error(response: httpx.Response, status: int, *fragments: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()["error"]
    assert isinstance(message, str) and message
    assert "Traceback" not in response.text
    for fragment in fragments:
        assert fragment in message
    return message


def test_missing_key_is_401(live: LiveServer) -> None:
    assert_error(live.post({"prompt": "x"}, key=None), 401, "Missing Authorization or x-api-key")


def test_a_bearer_token_is_taken_on_v1_as_on_the_openai_surface(live: LiveServer) -> None:
    key = live.key("1")
    url = f"{live.base_url}/v1/{SLUG}"
    answer = httpx.post(url, json={"prompt": "bearer", **SMALL}, headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/jpeg"
    assert Decimal(answer.headers["x-remaining-credits"]) < 1
    wrong = httpx.post(url, json={"prompt": "x"}, headers={"Authorization": "Bearer sd3_not-a-real-key"})
    assert_error(wrong, 401, "API key is invalid")


def test_unknown_key_is_401(live: LiveServer) -> None:
    response = live.post({"prompt": "x"}, key="sd3_not-a-real-key")
    assert_error(response, 401, "API key is invalid")
    assert "x-remaining-credits" not in response.headers


def test_disabled_key_is_401_and_not_charged(live: LiveServer) -> None:
    key = live.key("1")
    record = live.ledger.find_by_hash(hash_key(key))
    assert record is not None
    name = record.name
    live.ledger.set_enabled(name, False)
    try:
        assert_error(live.post({"prompt": "x", **SMALL}, key=key), 401)
    finally:
        live.ledger.set_enabled(name, True)


def test_unknown_path_is_404_json(live: LiveServer) -> None:
    assert_error(live.post({"prompt": "x"}, key=live.key(), path="/v1/no-such-model"), 404)
    assert_error(httpx.get(live.base_url + "/nothing/here"), 404)


def test_wrong_method_is_405_json(live: LiveServer) -> None:
    response = httpx.get(f"{live.base_url}/v1/{SLUG}", headers={"x-api-key": live.key()})
    assert_error(response, 405)
    assert "POST" in response.headers["allow"]


def test_not_enough_credits_is_406_and_nothing_is_charged(live: LiveServer) -> None:
    key = live.key("0.01")
    response = live.post({"prompt": "x"}, key=key)  # 1024x1024, 25 steps: 0.039
    assert_error(response, 406, "Not enough credits")
    assert response.headers["x-remaining-credits"] == "0.01"
    assert live.balance_of(key) == Decimal("0.01")


def test_a_406_reports_the_balance_the_ledger_saw_not_the_one_read_at_authentication(
    live: LiveServer,
) -> None:
    # The report: 0.0078 in x-remaining-credits while the body said 0.000000, because the header
    # came from the balance read when the key was authenticated. The route authenticates before it
    # reads the body, so holding back the body leaves a window for another request to spend.
    key = live.key("0.0039")  # exactly one SMALL image
    record = live.ledger.find_by_hash(hash_key(key))
    assert record is not None
    body = json.dumps({"prompt": "late", **SMALL}).encode()
    rest_of_body = threading.Event()
    answers: list[httpx.Response] = []

    def held_back_body() -> Iterator[bytes]:
        yield body[:1]
        rest_of_body.wait(60)
        yield body[1:]

    def send() -> None:
        headers = {"x-api-key": key, "content-type": "application/json"}
        answers.append(
            httpx.post(f"{live.base_url}/v1/{SLUG}", content=held_back_body(), headers=headers, timeout=60)
        )

    client = threading.Thread(target=send)
    client.start()
    # Authentication takes milliseconds; were it slower than this pause, the header would read 0
    # either way and the test would pass without testing, never fail wrongly.
    time.sleep(0.5)
    live.ledger.reserve(key_id=record.id, amount=Decimal("0.0039"), request_id=f"elsewhere-{record.id}")
    live.ledger.settle(f"elsewhere-{record.id}")
    rest_of_body.set()
    client.join(60)
    (response,) = answers
    assert_error(response, 406, "the balance is 0.000000")
    assert response.headers["x-remaining-credits"] == "0"


def test_non_json_content_type_is_406(live: LiveServer) -> None:
    key = live.key()
    response = httpx.post(
        f"{live.base_url}/v1/{SLUG}",
        content="prompt=x",
        headers={"x-api-key": key, "content-type": "application/x-www-form-urlencoded"},
    )
    assert_error(response, 406, "Invalid content type")
    assert live.balance_of(key) == Decimal("10")


def test_a_compressed_body_is_406_naming_the_encoding(live: LiveServer) -> None:
    key = live.key()
    response = httpx.post(
        f"{live.base_url}/v1/{SLUG}",
        content=gzip.compress(json.dumps({"prompt": "x", **SMALL}).encode()),
        headers={"x-api-key": key, "content-type": "application/json", "content-encoding": "gzip"},
    )
    assert_error(response, 406, "Content-Encoding 'gzip' is not accepted: send the JSON uncompressed")
    assert live.balance_of(key) == Decimal("10")
    plain = {"x-api-key": key, "content-type": "application/json", "content-encoding": "identity"}
    assert (
        httpx.post(f"{live.base_url}/v1/{SLUG}", json={"prompt": "x", **SMALL}, headers=plain).status_code
        == 200
    )


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ({}, ("prompt", "required")),
        ({"prompt": "   "}, ("prompt",)),
        ({"prompt": "x", "img_width": 1001}, ("img_width", "multiple of 8")),
        ({"prompt": "x", "img_height": 4096}, ("img_height", "2048")),
        ({"prompt": "x", "num_inference_steps": 5}, ("num_inference_steps", "10")),
        ({"prompt": "x", "samples": 5}, ("samples",)),
        ({"prompt": "x", "guidance_scale": 30}, ("guidance_scale",)),
        ({"prompt": "x", "denoise": 0}, ("denoise",)),
        ({"prompt": "x", "seed": 10**15}, ("seed",)),
        ({"prompt": "x", "seed": "abc"}, ("seed",)),
        ({"prompt": "x", "modelsamplingsd3_shift": 11}, ("modelsamplingsd3_shift",)),
        (
            {"prompt": "x", "conditioningsettimesteprange_start": 0.05},
            ("conditioningsettimesteprange_start",),
        ),
        ({"prompt": "x", "scheduler": "Magic Sampler"}, ("scheduler", "DPM++ 2M", "Euler")),
        ({"prompt": "x", "base64": "maybe"}, ("base64",)),
    ],
)
def test_invalid_parameters_are_422_naming_the_field(live: LiveServer, body: dict, fragments: tuple) -> None:
    key = live.key()
    response = live.post(body, key=key)
    assert_error(response, 422, *fragments)
    assert response.headers["x-remaining-credits"] == "10"
    assert live.balance_of(key) == Decimal("10")


@pytest.mark.parametrize(
    ("field", "text"),
    [
        ("img_width", "5_12"),  # Python's int() reads this as 512
        ("seed", "1_000"),
        ("num_inference_steps", "١٠"),  # Arabic-Indic digits: int() reads 10
        ("samples", " 1"),
        ("guidance_scale", "5_0"),  # float() reads 50.0
        ("guidance_scale", "nan"),
        ("denoise", "0x1"),
    ],
)
def test_numbers_in_strings_must_be_plain_digits(live: LiveServer, field: str, text: str) -> None:
    key = live.key()
    response = live.post({"prompt": "x", **SMALL, field: text}, key=key)
    assert_error(response, 422, field, "plain number")
    assert live.balance_of(key) == Decimal("10")


@pytest.mark.parametrize("field", ["samples", "guidance_scale", "seed", "img_width", "denoise"])
def test_json_booleans_are_not_numbers(live: LiveServer, field: str) -> None:
    key = live.key()
    assert_error(live.post({"prompt": "x", **SMALL, field: True}, key=key), 422, field, "not true")
    assert live.balance_of(key) == Decimal("10")


@pytest.mark.parametrize(("text", "image_type"), [("yes", "application/json"), ("off", "image/jpeg")])
def test_base64_takes_the_usual_boolean_words(live: LiveServer, text: str, image_type: str) -> None:
    # Decided (README, Parameters): true/false, 1/0, yes/no, on/off, t/f, y/n in any case; nothing else.
    response = live.post({"prompt": "x", **SMALL, "base64": text}, key=live.key())
    assert response.status_code == 200 and response.headers["content-type"] == image_type
    assert_error(live.post({"prompt": "x", **SMALL, "base64": "maybe"}, key=live.key()), 422, "base64")


def test_plain_numbers_in_strings_are_still_accepted(live: LiveServer) -> None:
    body = {"prompt": "x", **SMALL, "seed": "-1", "guidance_scale": "4.5", "denoise": "1e0"}
    assert live.post(body, key=live.key()).status_code == 200


@pytest.mark.parametrize("field", ["scheduler", "img_width", "prompt"])
def test_a_huge_invalid_value_is_not_echoed_whole(live: LiveServer, field: str) -> None:
    # 900 KB: under the 1 MiB body limit, so it reaches validation.
    huge = "9" * 900_000 if field == "img_width" else "Z" * 900_000
    body = {"prompt": "x", field: huge} if field != "prompt" else {"prompt": huge}
    response = live.post(body, key=live.key())
    message = assert_error(response, 422, field)
    assert len(response.content) < 2000, len(response.content)
    assert "ZZZZZZZZZZ…" in message or "9999999999…" in message


@pytest.mark.parametrize(
    ("field", "text"),
    [
        ("prompt", "a (cat:1e39)"),  # inf in float32: NaN latents, a 500 before
        ("negative_prompt", "(blurry:-1e6)"),
        ("prompt", "(" * 30 + "cat" + ")" * 30),  # 1.1 ** 30 = 17
    ],
)
def test_an_unusable_prompt_weight_is_422_and_not_charged(live: LiveServer, field: str, text: str) -> None:
    key = live.key()
    body = {"prompt": "x", **SMALL, field: text}
    assert_error(live.post(body, key=key), 422, field, "weight", "-10 to 10")
    assert live.balance_of(key) == Decimal("10")


def test_prompt_weights_within_the_bound_generate(live: LiveServer) -> None:
    body = {"prompt": "a (cat:10) (dog:-10)", "negative_prompt": "((blurry))", **SMALL}
    assert live.post(body, key=live.key()).status_code == 200


def test_malformed_json_is_422(live: LiveServer) -> None:
    key = live.key()
    response = httpx.post(
        f"{live.base_url}/v1/{SLUG}",
        content=b'{"prompt": "x",',
        headers={"x-api-key": key, "content-type": "application/json"},
    )
    assert_error(response, 422, "JSON")


def test_auth_is_checked_before_validation(live: LiveServer) -> None:
    assert_error(live.post({"img_width": 3}, key=None), 401)


def test_user_credits_reports_the_balance(live: LiveServer) -> None:
    key = live.key("2.5")
    response = httpx.get(f"{live.base_url}/v1/get-user-credits", headers={"x-api-key": key})
    assert response.status_code == 200
    assert response.json() == {"credits": 2.5, "free-credits": 0}
    assert response.headers["x-remaining-credits"] == "2.5"
    assert_error(httpx.get(f"{live.base_url}/v1/get-user-credits"), 401)


def test_schedulers_are_discoverable(live: LiveServer) -> None:
    names = httpx.get(f"{live.base_url}/v1/schedulers").json()["schedulers"]
    assert "DPM++ 2M" in names and "Euler" in names


def test_health_answers(live: LiveServer) -> None:
    response = httpx.get(f"{live.base_url}/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_concurrent_requests_never_overspend_a_small_balance(live: LiveServer) -> None:
    price = Decimal("0.0039")  # 512x512, 10 steps
    key = live.key(price * 2)
    body = {"prompt": "a crowd", "seed": 1, **SMALL}
    with ThreadPoolExecutor(max_workers=6) as pool:
        codes = sorted(r.status_code for r in pool.map(lambda _: live.post(body, key=key), range(6)))
    assert codes == [200, 200, 406, 406, 406, 406]
    assert live.balance_of(key) == Decimal("0")


@pytest.mark.parametrize("name", public_names())
def test_every_public_scheduler_name_is_accepted_and_generates(runtime: Runtime, name: str) -> None:
    # In-process: the body's validation and the pipeline call that a request makes; the HTTP path
    # around them is the same for every name, and is covered by the test below. The body is
    # validated at the API's sizes, but the sampler runs on the smallest image and step count the
    # pipeline accepts: each name still calls its real sampler, 36 of them in seconds, not minutes.
    body = Txt2ImgRequest.model_validate({"prompt": "a bridge", "scheduler": name, "seed": 9, **SMALL})
    request = GenerationRequest(
        prompt=body.prompt, scheduler=body.scheduler, seed=body.seed, steps=3, width=16, height=16
    )
    [result] = runtime.generator.generate_batch([request])
    (image,) = result.images
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8


@pytest.mark.parametrize("name", ["Euler a", "dpmpp_2m_sde_gpu"])
def test_a_scheduler_name_generates_over_http(live: LiveServer, name: str) -> None:
    assert name in httpx.get(f"{live.base_url}/v1/schedulers").json()["schedulers"]
    response = live.post({"prompt": "a bridge", "scheduler": name, "seed": 9, **SMALL}, key=live.key())
    assert response.status_code == 200, (name, response.text)
    assert jpeg(response.content).size == (512, 512)


def test_an_unexpected_failure_is_a_json_500_and_a_broken_database_a_json_503(
    settings: Settings, runtime: Runtime, tmp_path_factory: pytest.TempPathFactory
) -> None:
    db = tmp_path_factory.mktemp("broken") / "ledger.sqlite3"
    for server in live_server(settings.model_copy(update={"database_url": f"sqlite:///{db}"}), runtime):
        key = server.key("1")

        def bug() -> None:
            raise RuntimeError("a bug no handler knows")

        # A route with a bug in it, on the real app and server: what no domain error covers.
        server.app.add_api_route("/v1/bug", bug)
        response = httpx.get(f"{server.base_url}/v1/bug")
        assert response.status_code == 500 and response.headers["content-type"] == "application/json"
        # The request's id names it in the server's log (the traceback is logged, never sent).
        assert re.search(r"Internal server error \(request [0-9a-f-]{36}", response.json()["error"])
        assert "a bug no handler knows" not in response.text
        # A real fault below the HTTP layer: the keys table is gone from under the running server.
        with sqlite3.connect(db) as conn:
            conn.execute("PRAGMA foreign_keys=OFF")
            conn.execute("DROP TABLE api_keys")
        response = server.post({"prompt": "x", **SMALL}, key=key)
        assert response.status_code == 503 and response.headers["content-type"] == "application/json"
        assert set(response.json()) == {"error"}
