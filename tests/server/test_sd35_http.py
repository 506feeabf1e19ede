"""The SD3.5 slugs over real HTTP, each on its tiny twin, and slugs routed by the loaded family."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from PIL import Image

from pipelines.loading import ModelSpec, load_model
from pipelines.request import GenerationRequest
from pipelines.sd3 import SD3Generator
from schedulers.guidance import GuidedDenoiser, plain_negative
from server.config import Settings
from server.job_store import JobStore
from server.ledger import Ledger
from server.schemas import (
    SD35_REQUESTS,
    SD35LargeRequest,
    SD35MediumRequest,
    SD35TurboRequest,
    not_served_message,
)
from server.serving import sd35_generation_request
from tests.conftest import SDK
from tests.databases import migrated
from tests.live import LiveServer, twin_server, twin_server_at, wait_for

LARGE = "stable-diffusion-3.5-large-txt2img"
TURBO = "stable-diffusion-3.5-turbo-txt2img"
MEDIUM = "stable-diffusion-3.5-medium-txt2img"
SD3 = "stable-diffusion-3-medium-txt2img"
IMG2IMG = "sd3-med-img2img"
# Small and few steps: the point is the contract, not the picture.
TINY = {"width": 64, "height": 64}


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory, settings: Settings) -> Iterator[LiveServer]:
    yield from twin_server(tmp_path_factory, settings, "tiny:sd3.5-large")


@pytest.fixture(scope="module")
def turbo(tmp_path_factory: pytest.TempPathFactory, settings: Settings) -> Iterator[LiveServer]:
    yield from twin_server(tmp_path_factory, settings, "tiny:sd3.5-large-turbo")


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory, settings: Settings) -> Iterator[LiveServer]:
    yield from twin_server(tmp_path_factory, settings, "tiny:sd3.5-medium")


def price(
    base: str, *, steps: int, ref: int = 25, width: int = 64, height: int = 64, images: int = 1
) -> Decimal:
    exact = Decimal(base) * images * steps / ref * width * height / (1024 * 1024)
    return exact.quantize(Decimal("0.000001"))


def assert_error(response: httpx.Response, status: int, *fragments: str) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    for fragment in fragments:
        assert fragment in message, message
    return str(message)


def opened(data: bytes, kind: str) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == kind
    image.load()
    return image


# -- the contract of each slug, without HTTP ---------------------------------------------------------


def test_each_slug_has_its_pages_defaults_and_ranges() -> None:
    large, turbo, medium = (
        SD35LargeRequest(prompt="a fox"),
        SD35TurboRequest(prompt="a fox"),
        SD35MediumRequest(prompt="a fox"),
    )
    assert (large.steps, large.guidance_scale) == (30, 5.5)
    assert (turbo.steps, turbo.guidance_scale) == (4, 1.0)
    assert (medium.steps, medium.guidance_scale) == (40, 4.5)
    for body in (large, turbo, medium):
        assert body.negative_prompt == "low quality, blurry" and body.seed == 98552302
        assert (body.sampler, body.scheduler, body.aspect_ratio) == ("euler", "sgm_uniform", "custom")
        assert (body.size, body.batch_size, body.image_format, body.image_quality) == (
            (1024, 1024),
            1,
            "jpeg",
            95,
        )
    assert SD35TurboRequest(prompt="a", steps=1).steps == 1  # Turbo's own minimum
    with pytest.raises(ValueError, match="steps"):
        SD35LargeRequest(prompt="a", steps=1)


@pytest.mark.parametrize(
    ("ratio", "size"),
    [
        ("custom", (96, 200)),
        ("16:9", (1344, 768)),
        ("16:9 landscape 1344x768", (1344, 768)),
        ("9:21 Portrait 640x1536", (640, 1536)),
        ("2:3", (832, 1216)),
        ("4:5", (896, 1120)),
        ("5:4", (1120, 896)),
        ("1:1", (1024, 1024)),
    ],
)
def test_an_aspect_ratio_preset_overrides_the_size_and_custom_floors_it_to_8(
    ratio: str, size: tuple[int, int]
) -> None:
    body = SD35LargeRequest(prompt="a", aspect_ratio=ratio, width=101, height=207)
    assert body.size == size


def test_the_negative_prompt_is_plain_cfg_on_every_step_with_shift_3() -> None:
    job = sd35_generation_request(SD35LargeRequest(prompt="a", seed=-1), seed=7, negative_window=False)
    assert isinstance(job, GenerationRequest)
    assert (job.shift, job.negative_window, job.seed, job.schedule) == (3.0, False, 7, "sgm_uniform")
    (negative,) = plain_negative()
    assert negative.active(1.0) and negative.active(0.5) and negative.active(0.0)
    # Guidance 1 skips the negative entirely (Turbo's default).
    calls: list[tuple[str, ...]] = []

    def predict(x: object, sigma: float, names: tuple[str, ...]) -> list[object]:
        calls.append(names)
        return [x for _ in names]

    GuidedDenoiser(predict, cfg=1.0, ranges=plain_negative())(0, 0.9)  # type: ignore[arg-type]
    GuidedDenoiser(predict, cfg=4.5, ranges=plain_negative())(0, 0.9)  # type: ignore[arg-type]
    assert calls == [("positive",), ("positive", "negative")]


# -- each slug over HTTP on its twin ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "slug", "base", "steps"),
    [("large", LARGE, "0.014", 10), ("turbo", TURBO, "0.014", 2), ("medium", MEDIUM, "0.039", 10)],
)
def test_each_slug_answers_a_jpeg_on_its_twin_at_its_price(
    request: pytest.FixtureRequest, server: str, slug: str, base: str, steps: int
) -> None:
    live: LiveServer = request.getfixturevalue(server)
    key = live.key("1")
    response = live.post({"prompt": "a red fox", "steps": steps, **TINY}, key=key, path=f"/v1/{slug}")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    assert opened(response.content, "JPEG").size == (64, 64)
    cost = price(base, steps=steps)
    assert Decimal(response.headers["x-cost"]) == cost
    assert Decimal(response.headers["x-remaining-credits"]) == Decimal(1) - cost == live.balance_of(key)
    assert response.headers["x-seed-value"] == "98552302"
    # The root alias answers the same image.
    again = live.post({"prompt": "a red fox", "steps": steps, **TINY}, key=key, path=f"/{slug}")
    assert again.status_code == 200 and again.content == response.content


@pytest.mark.parametrize(
    ("image_format", "content_type", "kind"),
    [
        ("jpeg", "image/jpeg", "JPEG"),
        ("JPG", "image/jpeg", "JPEG"),
        ("png", "image/png", "PNG"),
        ("webp", "image/webp", "WEBP"),
    ],
)
def test_image_format_sets_the_content_type(
    turbo: LiveServer, image_format: str, content_type: str, kind: str
) -> None:
    body = {"prompt": "a fox", "steps": 1, "image_format": image_format, "image_quality": 50, **TINY}
    response = turbo.post(body, key=turbo.key(), path=f"/v1/{TURBO}")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == content_type
    assert opened(response.content, kind).size == (64, 64)


def test_base64_answers_json_in_the_requested_format(turbo: LiveServer) -> None:
    body = {"prompt": "a fox", "steps": 1, "image_format": "png", "base64": True, **TINY}
    payload = turbo.post(body, key=turbo.key(), path=f"/v1/{TURBO}").json()
    assert set(payload) == {"image"}
    opened(base64.b64decode(payload["image"]), "PNG")


def test_batch_size_2_answers_both_images_and_pays_for_both(turbo: LiveServer) -> None:
    key = turbo.key("1")
    body = {"prompt": "a fox", "steps": 2, "batch_size": 2, "seed": 3, **TINY}
    response = turbo.post(body, key=key, path=f"/v1/{TURBO}")
    assert response.status_code == 200, response.text
    payload = response.json()
    assert set(payload) == {"image", "images"} and len(payload["images"]) == 2
    assert payload["image"] == payload["images"][0] != payload["images"][1]
    assert Decimal(response.headers["x-cost"]) == price("0.014", steps=2, images=2)
    assert turbo.balance_of(key) == Decimal(1) - price("0.014", steps=2, images=2)


@pytest.mark.slow
def test_an_aspect_ratio_preset_sets_the_output_size_and_the_price(turbo: LiveServer) -> None:
    key = turbo.key("1")
    body = {"prompt": "a fox", "steps": 1, "aspect_ratio": "21:9", **TINY}
    response = turbo.post(body, key=key, path=f"/v1/{TURBO}")
    assert response.status_code == 200, response.text
    assert opened(response.content, "JPEG").size == (1536, 640)
    assert Decimal(response.headers["x-cost"]) == price("0.014", steps=1, width=1536, height=640)


def test_a_custom_size_is_floored_to_a_multiple_of_8(turbo: LiveServer) -> None:
    body = {"prompt": "a fox", "steps": 1, "width": 71, "height": 64}
    response = turbo.post(body, key=turbo.key(), path=f"/v1/{TURBO}")
    assert response.status_code == 200, response.text
    assert opened(response.content, "JPEG").size == (64, 64)


def test_seed_minus_1_is_drawn_and_reported(turbo: LiveServer) -> None:
    body = {"prompt": "a fox", "steps": 1, "seed": -1, **TINY}
    response = turbo.post(body, key=turbo.key(), path=f"/v1/{TURBO}")
    seed = int(response.headers["x-seed-value"])
    assert 0 <= seed <= 999_999_999_999_999 and response.headers["x-seed"] == str(seed)
    replay = turbo.post({**body, "seed": seed}, key=turbo.key(), path=f"/v1/{TURBO}")
    assert replay.content == response.content


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"aspect_ratio": "7:3"}, "aspect_ratio: unknown aspect ratio"),
        ({"steps": 71}, "steps:"),
        ({"steps": 0}, "steps:"),
        ({"guidance_scale": 15.5}, "guidance_scale:"),
        ({"width": 63}, "width:"),
        ({"height": 2049}, "height:"),
        ({"batch_size": 5}, "batch_size:"),
        ({"image_format": "gif"}, "image_format: unknown image format"),
        ({"image_quality": 0}, "image_quality:"),
        ({"sampler": "nope"}, "sampler: unknown sampler"),
        ({"scheduler": "nope"}, "scheduler: unknown scheduler"),
        ({"seed": -2}, "seed:"),
        ({"prompt": " "}, "prompt:"),
    ],
)
def test_bad_fields_are_a_422_that_charges_nothing(
    turbo: LiveServer, fields: dict[str, object], fragment: str
) -> None:
    key = turbo.key("1")
    response = turbo.post({"prompt": "a fox", **TINY, **fields}, key=key, path=f"/v1/{TURBO}")
    assert_error(response, 422, fragment)
    assert turbo.balance_of(key) == Decimal(1)


def test_large_keeps_the_pages_10_step_minimum(large: LiveServer) -> None:
    key = large.key("1")
    assert_error(large.post({"prompt": "a", "steps": 4, **TINY}, key=key, path=f"/v1/{LARGE}"), 422, "steps:")
    assert large.balance_of(key) == Decimal(1)


def test_page_spellings_of_samplers_and_schedules_are_taken(turbo: LiveServer) -> None:
    for sampler, scheduler in (
        ("euler_ancestra", "SGM_Uniform"),
        ("DPM++ 2M", "karras"),
        ("euler_a", "beta"),
    ):
        body = {"prompt": "a fox", "steps": 1, "sampler": sampler, "scheduler": scheduler, **TINY}
        response = turbo.post(body, key=turbo.key(), path=f"/v1/{TURBO}")
        assert response.status_code == 200, (sampler, response.text)


def test_v2_runs_a_35_job_and_its_output_keeps_the_format(turbo: LiveServer) -> None:
    key = turbo.key("1")
    headers = {"x-api-key": key}
    body = {"prompt": "a fox", "steps": 2, "seed": 11, "image_format": "png", **TINY}
    submitted = turbo.post(body, key=key, path=f"/v2/{TURBO}")
    assert submitted.status_code == 200, submitted.text
    status_url = submitted.json()["status_url"]
    assert wait_for(lambda: httpx.get(status_url, headers=headers).json()["status"] == "COMPLETED", 120)
    result = httpx.get(submitted.json()["response_url"], headers=headers).json()
    assert result["seed"] == 11 and result["metrics"]["cost"] == float(price("0.014", steps=2))
    assert str(result["output"]).endswith(".png")
    output = httpx.get(result["output"])
    assert output.headers["content-type"] == "image/png"
    v1 = turbo.post(body, key=turbo.key(), path=f"/v1/{TURBO}")
    assert output.content == v1.content  # the same image through either surface
    item = httpx.get(f"{turbo.base_url}/v1/history", headers=headers).json()["items"][0]
    assert item["model_name"] == TURBO and item["request_body"]["image_format"] == "png"
    # A bad body is refused at the door: no job, nothing reserved.
    assert_error(
        turbo.post({**body, "aspect_ratio": "3:7"}, key=key, path=f"/v2/{TURBO}"), 422, "aspect_ratio"
    )


@pytest.mark.parametrize(("slug", "twin"), [(LARGE, "large"), (TURBO, "turbo"), (MEDIUM, "medium")])
def test_the_sdk_runs_each_35_slug_sync_and_as_a_v2_job(
    slug: str, twin: str, sdk: SDK, request: pytest.FixtureRequest
) -> None:
    server: LiveServer = request.getfixturevalue(twin)
    client = sdk(api_key=server.key("1"), base_url=f"{server.base_url}/v1", timeout=120)
    fields = {"prompt": "a fox", "steps": 10, "seed": 4, **TINY}
    response = client.run_sync(slug, **fields)
    assert response.status_code == 200
    assert Image.open(io.BytesIO(response.content)).size == (64, 64)
    result = client.run(slug, **fields)
    assert result["status"] == "COMPLETED" and result["seed"] == 4
    assert str(result["output"]).endswith(".jpg")


# -- routing by the loaded family ------------------------------------------------------------------


@pytest.mark.parametrize(
    "slug", [SD3, IMG2IMG, TURBO, MEDIUM, "sd3-med-canny", "stable-diffusion-3-large-txt2img"]
)
@pytest.mark.parametrize("prefix", ["/v1/", "/v2/", "/"])
def test_a_slug_of_another_family_is_a_404_that_says_what_runs_here(
    large: LiveServer, slug: str, prefix: str
) -> None:
    key = large.key("1")
    response = large.post({"prompt": "a fox", **TINY}, key=key, path=f"{prefix}{slug}")
    message = assert_error(
        response,
        404,
        f"'{slug}' is not served here: this server runs sd3.5-large (tiny:sd3.5-large); served: {LARGE}",
    )
    if slug == "sd3-med-canny":
        assert "ControlNet" in message
    if slug.startswith("stable-diffusion-3-large"):
        assert "Stability AI's hosted model" in message
    assert large.balance_of(key) == Decimal(1)
    assert httpx.get(f"{large.base_url}/v1/history", headers={"x-api-key": key}).json()["items"] == []
    # Refused before the key is looked up: with no key, the answer is the same 404.
    assert large.post({}, key=None, path=f"{prefix}{slug}").status_code == 404


def test_the_schedulers_list_shows_only_the_served_slug(large: LiveServer) -> None:
    listing = httpx.get(f"{large.base_url}/v1/schedulers").json()
    assert list(listing["models"]) == [LARGE] and listing["default"] == "euler"
    assert listing["models"][LARGE]["sampler"]["default"] == "euler"
    assert "beta" in listing["models"][LARGE]["scheduler"]["accepted"]


def test_an_sd3_medium_server_serves_its_two_slugs_and_404s_the_35_ones(live: LiveServer) -> None:
    key = live.key("1")
    small = {"img_width": 512, "img_height": 512, "num_inference_steps": 10}
    assert live.post({"prompt": "a fox", **small}, key=key).status_code == 200
    for slug in (LARGE, TURBO, MEDIUM):
        for prefix in ("/v1/", "/v2/", "/"):
            before = live.balance_of(key)
            assert_error(
                live.post({"prompt": "a fox"}, key=key, path=f"{prefix}{slug}"),
                404,
                f"this server runs sd3-medium (tiny); served: {SD3}, {IMG2IMG}",
            )
            assert live.balance_of(key) == before
    listing = httpx.get(f"{live.base_url}/v1/schedulers").json()
    assert list(listing["models"]) == [SD3, IMG2IMG] and listing["default"] == "DPM++ 2M"


def test_the_message_names_the_family_model_and_served_slugs() -> None:
    assert not_served_message(
        SD3, family="sd3.5-medium", model_id="stabilityai/stable-diffusion-3.5-medium"
    ) == (
        f"'{SD3}' is not served here: this server runs sd3.5-medium "
        f"(stabilityai/stable-diffusion-3.5-medium); served: {MEDIUM}"
    )


def test_a_turbo_family_setting_serves_turbo_on_large_weights(
    tmp_path_factory: pytest.TempPathFactory, settings: Settings
) -> None:
    """Large and Large Turbo share one architecture: `model.family` decides which slug answers."""
    servers = twin_server(tmp_path_factory, settings, "tiny:sd3.5-large", family="sd3.5-large-turbo")
    live = next(servers)
    try:
        key = live.key("1")
        assert live.post({"prompt": "a", "steps": 1, **TINY}, key=key, path=f"/v1/{TURBO}").status_code == 200
        assert live.post({"prompt": "a", **TINY}, key=key, path=f"/v1/{LARGE}").status_code == 404
    finally:
        servers.close()


def test_an_accepted_35_job_left_by_a_stopped_server_runs_at_the_next_start(
    settings: Settings, tmp_path: Path
) -> None:
    """Recovery rebuilds an SD3.5 job from its recorded body: its slug's defaults and its format."""
    url = migrated(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    ledger = Ledger(url)
    record, key = ledger.create_key(name="left", credits=Decimal(1))
    params = SD35TurboRequest(prompt="a fox", steps=1, seed=9, image_format="webp", **TINY).model_dump(
        mode="json"
    )
    ledger.reserve(key_id=record.id, amount=Decimal("0.01"), request_id="left-35", owner="old-me")
    JobStore(ledger.engine).create(
        request_id="left-35",
        key_id=record.id,
        surface="v2",
        model=TURBO,
        params=params,
        cost=Decimal("0.01"),
        owner="old-me",
    )
    servers = twin_server_at(settings, url, tmp_path, "tiny:sd3.5-large-turbo", instance_id="old-me")
    live = next(servers)  # its start-up runs the recovery
    try:
        headers = {"x-api-key": key}
        status = f"{live.base_url}/v2/requests/left-35/status"
        assert wait_for(lambda: httpx.get(status, headers=headers).json()["status"] == "COMPLETED", 120)
        result = httpx.get(f"{live.base_url}/v2/requests/left-35", headers=headers).json()
        assert result["seed"] == 9 and result["metrics"]["cost"] == 0.01  # the price it was charged
        assert str(result["output"]).endswith(".webp")
        assert httpx.get(result["output"]).headers["content-type"] == "image/webp"
        assert ledger.charge("left-35") == "settled"
    finally:
        servers.close()
        ledger.close()


def test_the_openapi_document_lists_only_the_slugs_this_server_answers(
    large: LiveServer, live: LiveServer
) -> None:
    def slug_paths(server: LiveServer) -> set[str]:
        paths = httpx.get(f"{server.base_url}/openapi.json", timeout=30).json()["paths"]
        slugs = {SD3, IMG2IMG, LARGE, TURBO, MEDIUM}
        return {path for path in paths if path.rsplit("/", 1)[-1] in slugs}

    assert slug_paths(large) == {f"/v1/{LARGE}", f"/v2/{LARGE}"}
    assert slug_paths(live) == {f"/v1/{SD3}", f"/v2/{SD3}", f"/v1/{IMG2IMG}", f"/v2/{IMG2IMG}"}
    # The others still answer, with the 404 that says what runs here (docs/contract.md §9).
    assert_error(large.post({"prompt": "a"}, key=large.key(), path=f"/v1/{TURBO}"), 404, "not served")


# -- every name a slug lists generates on its twin -----------------------------------------------------


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SD3Generator]:
    # Large (qk-norm) and Medium (MMDiT-X dual attention): Turbo is Large's architecture.
    tiny = tmp_path_factory.mktemp("tiny")
    return {
        slug: SD3Generator(load_model(ModelSpec(source=source, tiny_dir=tiny, device="cpu")))
        for slug, source in ((LARGE, "tiny:sd3.5-large"), (MEDIUM, "tiny:sd3.5-medium"))
    }


def test_every_sampler_and_schedule_a_slug_lists_generates_on_its_twin(
    large: LiveServer, twins: dict[str, SD3Generator]
) -> None:
    # In-process, as the SD3 txt2img names are (tests/server/test_txt2img_http.py): the body's
    # validation and the job a request makes, run at the smallest size and step count; the HTTP path
    # around them is the same for every name and is covered above.
    listed = httpx.get(f"{large.base_url}/v1/schedulers").json()["models"][LARGE]
    samplers, schedules = listed["sampler"]["accepted"], listed["scheduler"]["accepted"]
    assert len(samplers) >= 30 and len(schedules) >= 7
    choices = [{"sampler": name} for name in samplers] + [{"scheduler": name} for name in schedules]
    for slug, generator in twins.items():
        request_type = SD35_REQUESTS[slug]
        for choice in choices:
            body = request_type.model_validate({"prompt": "a bridge", "seed": 9, **choice})
            job = sd35_generation_request(body, seed=body.seed, negative_window=False)
            [result] = generator.generate_batch([replace(job, steps=3, width=16, height=16)])
            (image,) = result.images
            assert image.shape == (16, 16, 3), (slug, choice)
