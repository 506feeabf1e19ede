"""`POST /v1/images/generations` driven by the real `openai` SDK against a live server."""

from __future__ import annotations

import base64
import gzip
import io
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from server.config import PricingSettings, Settings
from server.pricing import price_of, sd35_price
from server.schemas import SD35_LARGE_SLUG, SD35_TURBO_SLUG
from tests.live import SLUG, LiveServer, twin_server

# Small and quick: the steps go as an extension field, the size as OpenAI's own parameter.
STEPS = {"num_inference_steps": 10}


Clients = Callable[[LiveServer, str], openai.OpenAI]


@pytest.fixture
def client() -> Iterator[Clients]:
    """Makes the SDK's clients and closes them after the test: each holds an httpx pool, and an unclosed
    one leaks its sockets into whichever later test the garbage collector happens to run in."""
    made: list[openai.OpenAI] = []

    def make(live: LiveServer, key: str) -> openai.OpenAI:
        # No retries: a test must see the first answer, and a retried generation would be charged twice.
        made.append(openai.OpenAI(base_url=f"{live.base_url}/v1", api_key=key, max_retries=0, timeout=120))
        return made[-1]

    yield make
    for sdk in made:
        sdk.close()


def decode(b64: str | None) -> Image.Image:
    assert b64 is not None
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "JPEG"
    return image


def expected_price(*, width: int, height: int, steps: int, samples: int) -> Decimal:
    return price_of(width=width, height=height, steps=steps, samples=samples, pricing=PricingSettings())


def test_b64_json_returns_a_jpeg_of_the_asked_size(live: LiveServer, client: Clients) -> None:
    key = live.key()
    result = client(live, key).images.generate(
        model="stable-diffusion-3-medium",
        prompt="a lighthouse at dusk",
        size="512x640",
        response_format="b64_json",
        extra_body=STEPS,
    )
    assert result.created > 0
    assert result.data is not None and len(result.data) == 1
    assert decode(result.data[0].b64_json).size == (512, 640)
    assert result.output_format == "jpeg"


def test_url_points_at_a_downloadable_jpeg_of_the_asked_size(live: LiveServer, client: Clients) -> None:
    key = live.key()
    result = client(live, key).images.generate(
        model="dall-e-3",  # any model name is accepted: there is one model here
        prompt="a lighthouse at dusk",
        size="640x512",
        response_format="url",
        quality="hd",
        style="vivid",
        user="someone",
        extra_body=STEPS,
    )
    assert result.data is not None and len(result.data) == 1
    url = result.data[0].url
    assert url is not None and url.startswith(f"{live.base_url}/v1/outputs/") and url.endswith(".jpg")
    # A capability URL: fetched without any key.
    image = httpx.get(url, timeout=30)
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/jpeg"
    picture = Image.open(io.BytesIO(image.content))
    assert (picture.format, picture.size) == ("JPEG", (640, 512))


def test_url_is_the_default_and_honours_the_proxy_headers(live: LiveServer) -> None:
    key = live.key()
    response = httpx.post(
        f"{live.base_url}/v1/images/generations",
        json={"prompt": "a fox", "size": "512x512", **STEPS},
        headers={
            "Authorization": f"Bearer {key}",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "images.example.com",
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text
    url = response.json()["data"][0]["url"]
    assert url.startswith("https://images.example.com/v1/outputs/")
    output = url.removeprefix("https://images.example.com")
    assert httpx.get(live.base_url + output, timeout=30).status_code == 200


def test_n_2_returns_two_images_and_is_charged_like_the_segmind_request(
    live: LiveServer, client: Clients
) -> None:
    key = live.key("10")
    result = client(live, key).images.generate(
        model="sd3", prompt="two cats", n=2, size="512x768", response_format="b64_json", extra_body=STEPS
    )
    assert result.data is not None and len(result.data) == 2
    for item in result.data:
        assert decode(item.b64_json).size == (512, 768)
    price = expected_price(width=512, height=768, steps=10, samples=2)
    # 0.039 x 2 samples x 10/25 steps x (512 x 768)/1024^2 pixels
    assert price == Decimal("0.01170")
    assert live.balance_of(key) == Decimal("10") - price

    # The same request on the Segmind surface costs exactly the same.
    segmind_key = live.key("10")
    body = {"prompt": "two cats", "samples": 2, "img_width": 512, "img_height": 768, "base64": True, **STEPS}
    response = live.post(body, key=segmind_key, path=f"/v1/{SLUG}")
    assert response.status_code == 200
    assert Decimal(response.headers["x-cost"]) == price
    assert live.balance_of(segmind_key) == live.balance_of(key)


def test_the_contract_headers_come_with_the_answer(live: LiveServer, client: Clients) -> None:
    key = live.key("10")
    raw = client(live, key).images.with_raw_response.generate(
        model="sd3",
        prompt="a red bicycle",
        size="512x512",
        response_format="b64_json",
        extra_body={
            **STEPS,
            "seed": 1234,
            "negative_prompt": "blurry",
            "scheduler": "Euler",
            "guidance_scale": 4,
        },
    )
    price = expected_price(width=512, height=512, steps=10, samples=1)
    assert Decimal(raw.headers["x-cost"]) == price
    assert Decimal(raw.headers["x-remaining-credits"]) == Decimal("10") - price
    assert raw.headers["x-seed"] == "1234"
    assert raw.headers["x-request-id"]
    assert raw.parse().data is not None


def test_size_auto_is_1024_square(live: LiveServer, client: Clients) -> None:
    key = live.key("10")
    result = client(live, key).images.generate(
        model="sd3", prompt="a pear", size="auto", response_format="b64_json", extra_body=STEPS
    )
    assert result.data is not None
    assert decode(result.data[0].b64_json).size == (1024, 1024)
    assert live.balance_of(key) == Decimal("10") - expected_price(
        width=1024, height=1024, steps=10, samples=1
    )


def test_a_wrong_key_is_an_authentication_error(live: LiveServer, client: Clients) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        client(live, "sd3_not-a-key").images.generate(model="sd3", prompt="a fox", size="512x512")
    assert caught.value.status_code == 401
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == "invalid_api_key" and body["message"]


def test_a_missing_key_is_401_in_openai_shape(live: LiveServer) -> None:
    response = httpx.post(f"{live.base_url}/v1/images/generations", json={"prompt": "a fox"}, timeout=30)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "x-api-key" in error["message"]


def test_x_api_key_is_accepted_too(live: LiveServer) -> None:
    key = live.key()
    response = httpx.post(
        f"{live.base_url}/v1/images/generations",
        json={"prompt": "a fox", "size": "512x512", "response_format": "b64_json", **STEPS},
        headers={"x-api-key": key},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert decode(response.json()["data"][0]["b64_json"]).size == (512, 512)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"size": "256x256"}, "size"),
        ({"size": "1020x1020"}, "size"),  # not a multiple of 8
        ({"size": "4096x1024"}, "size"),
        ({"size": "large"}, "size"),
        ({"n": 5}, "n"),
        ({"response_format": "png"}, "response_format"),
        ({"output_format": "png"}, "output_format"),
        ({"num_inference_steps": 5}, "num_inference_steps"),
        ({"scheduler": "no such sampler"}, "scheduler"),
        ({"seed": "5_12"}, "seed"),  # plain digits only: Python's int() reads 512
        ({"guidance_scale": "5_0"}, "guidance_scale"),
        ({"negative_prompt": "(blurry:1e39)"}, "negative_prompt"),
    ],
)
def test_invalid_input_is_a_bad_request_naming_the_field_and_charges_nothing(
    live: LiveServer, extra: dict[str, object], param: str, client: Clients
) -> None:
    key = live.key("10")
    with pytest.raises(openai.BadRequestError) as caught:
        client(live, key).images.generate(model="sd3", prompt="a fox", extra_body=extra)
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["type"] == "invalid_request_error" and body["param"] == param
    assert param in body["message"]
    assert caught.value.response.headers["x-remaining-credits"] == "10"
    assert live.balance_of(key) == Decimal("10")


def test_malformed_json_is_a_bad_request(live: LiveServer) -> None:
    response = httpx.post(
        f"{live.base_url}/v1/images/generations",
        content=b"{not json",
        headers={"Authorization": f"Bearer {live.key()}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]["message"]


def test_a_compressed_body_is_a_bad_request_naming_the_encoding(live: LiveServer) -> None:
    key = live.key()
    response = httpx.post(
        f"{live.base_url}/v1/images/generations",
        content=gzip.compress(b'{"prompt": "a fox", "size": "512x512"}'),
        headers={
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
        },
        timeout=30,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["message"] == "Content-Encoding 'gzip' is not accepted: send the JSON uncompressed"
    assert live.balance_of(key) == Decimal("10")


def test_insufficient_credits_is_an_error_and_charges_nothing(live: LiveServer, client: Clients) -> None:
    key = live.key("0.001")
    with pytest.raises(openai.APIStatusError) as caught:
        client(live, key).images.generate(
            model="sd3", prompt="a fox", size="1024x1024", response_format="b64_json", extra_body=STEPS
        )
    assert caught.value.status_code == 406
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == "insufficient_quota"
    assert "credits" in body["message"].lower()
    assert caught.value.response.headers["x-remaining-credits"] == "0.001"
    assert live.balance_of(key) == Decimal("0.001")


# -- on an SD3.5 server: the loaded family's slug, with its defaults and its price -------------------


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory, settings: Settings) -> Iterator[LiveServer]:
    yield from twin_server(tmp_path_factory, settings, "tiny:sd3.5-large")


@pytest.fixture(scope="module")
def turbo(tmp_path_factory: pytest.TempPathFactory, settings: Settings) -> Iterator[LiveServer]:
    yield from twin_server(tmp_path_factory, settings, "tiny:sd3.5-large-turbo")


def last_request(live: LiveServer, key: str) -> dict[str, Any]:
    """The key's newest history row: the slug and the body the request ran as."""
    items = httpx.get(f"{live.base_url}/v1/history", headers={"x-api-key": key}, timeout=30).json()["items"]
    return dict(items[0])


def sd35_cost(slug: str, *, steps: int, width: int = 512, height: int = 512, images: int = 1) -> Decimal:
    return sd35_price(
        slug=slug, width=width, height=height, steps=steps, images=images, pricing=PricingSettings()
    )


def test_on_sd35_large_a_bare_request_runs_the_large_slug_with_its_defaults_and_price(
    large: LiveServer, client: Clients
) -> None:
    key = large.key("10")
    raw = client(large, key).images.with_raw_response.generate(
        model="dall-e-3", prompt="a lighthouse at dusk", size="512x512", response_format="b64_json"
    )
    result = raw.parse()
    assert result.data is not None and len(result.data) == 1
    assert decode(result.data[0].b64_json).size == (512, 512)
    assert result.size == "512x512" and result.output_format == "jpeg"

    price = sd35_cost(SD35_LARGE_SLUG, steps=30)
    # Large's 0.014 per 25 steps, at its 30 default steps, not SD3 Medium's 0.039 per 25 steps.
    assert price == Decimal("0.004200")
    assert Decimal(raw.headers["x-cost"]) == price
    assert large.balance_of(key) == Decimal("10") - price
    assert raw.headers["x-seed"] == "98552302"  # the SD3.5 pages' default seed

    row = last_request(large, key)
    assert (row["model_name"], row["surface"]) == (SD35_LARGE_SLUG, "openai")
    body = row["request_body"]
    assert (body["steps"], body["guidance_scale"]) == (30, 5.5)
    assert body["negative_prompt"] == "low quality, blurry"
    assert (body["sampler"], body["scheduler"]) == ("euler", "sgm_uniform")
    assert (body["width"], body["height"], body["batch_size"]) == (512, 512, 1)


def test_on_sd35_turbo_n_and_urls_run_turbo_at_4_steps_and_guidance_1(
    turbo: LiveServer, client: Clients
) -> None:
    key = turbo.key("10")
    raw = client(turbo, key).images.with_raw_response.generate(
        model="sd3", prompt="two cats", n=2, size="512x768", response_format="url"
    )
    result = raw.parse()
    assert result.data is not None and len(result.data) == 2
    for item in result.data:
        assert item.url is not None and item.url.endswith(".jpg")
        image = httpx.get(item.url, timeout=30)
        assert image.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(image.content)).size == (512, 768)
    price = sd35_cost(SD35_TURBO_SLUG, steps=4, height=768, images=2)
    assert Decimal(raw.headers["x-cost"]) == price
    assert turbo.balance_of(key) == Decimal("10") - price
    body = last_request(turbo, key)["request_body"]
    assert (body["steps"], body["guidance_scale"], body["batch_size"]) == (4, 1.0, 2)


def test_on_sd35_the_extensions_are_the_slugs_own_fields(turbo: LiveServer, client: Clients) -> None:
    key = turbo.key("10")
    extensions = {
        "num_inference_steps": 2,  # the SD3 spelling is taken as `steps`
        "guidance_scale": 2,
        "negative_prompt": "blurry",
        "seed": 7,
        "sampler": "DPM++ 2M",
        "scheduler": "Karras",
    }
    raw = client(turbo, key).images.with_raw_response.generate(
        model="sd3", prompt="a pear", size="512x512", response_format="b64_json", extra_body=extensions
    )
    assert raw.headers["x-seed"] == "7"
    assert Decimal(raw.headers["x-cost"]) == sd35_cost(SD35_TURBO_SLUG, steps=2)
    body = last_request(turbo, key)["request_body"]
    assert (body["steps"], body["guidance_scale"], body["negative_prompt"]) == (2, 2.0, "blurry")
    assert (body["sampler"], body["scheduler"]) == ("DPM++ 2M", "karras")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"num_inference_steps": 5}, "num_inference_steps"),  # Large's minimum is 10
        ({"steps": 71}, "steps"),
        ({"steps": 20, "num_inference_steps": 25}, "steps"),
        ({"guidance_scale": 16}, "guidance_scale"),  # SD3.5's range is 1-15
        ({"scheduler": "DPM++ 2M"}, "scheduler"),  # on SD3.5 a schedule, not a sampler label
    ],
)
def test_on_sd35_an_extension_out_of_the_slugs_range_names_the_sent_field_and_charges_nothing(
    large: LiveServer, extra: dict[str, object], param: str, client: Clients
) -> None:
    key = large.key("10")
    with pytest.raises(openai.BadRequestError) as caught:
        client(large, key).images.generate(model="sd3", prompt="a fox", size="512x512", extra_body=extra)
    body = caught.value.body
    assert isinstance(body, dict) and body["param"] == param and param in body["message"]
    assert large.balance_of(key) == Decimal("10")


def test_on_sd3_medium_steps_is_taken_as_num_inference_steps(live: LiveServer, client: Clients) -> None:
    key = live.key("10")
    raw = client(live, key).images.with_raw_response.generate(
        model="sd3", prompt="a pear", size="512x512", response_format="b64_json", extra_body={"steps": 10}
    )
    assert Decimal(raw.headers["x-cost"]) == expected_price(width=512, height=512, steps=10, samples=1)
    row = last_request(live, key)
    assert row["model_name"] == SLUG and row["request_body"]["num_inference_steps"] == 10
