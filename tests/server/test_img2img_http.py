"""`sd3-med-img2img` over real HTTP on the tiny model: answers, price, seeds, names, errors, v2."""

from __future__ import annotations

import base64
import io
from decimal import Decimal
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from server.config import Settings
from server.image_input import URLS_OFF
from server.job_store import JobStore
from server.ledger import Ledger
from server.runtime import Runtime
from server.schemas import Img2ImgRequest
from tests.databases import migrated
from tests.live import LiveServer, live_server, wait_for

PATH = "/v1/sd3-med-img2img"
IMAGES = Path(__file__).parent.parent / "data" / "images"


def png_b64(width: int, height: int, *, noise: bool = False) -> str:
    if noise:
        pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    else:
        ys, xs = np.mgrid[0:height, 0:width]
        pixels = np.stack([xs % 256, ys % 256, (xs + ys) % 256], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


IMAGE = png_b64(261, 190)  # cropped to 256x184: the output size, and what is priced
FAST = {"num_inference_steps": 2, "seed": 5}


def body(**fields: object) -> dict[str, object]:
    return {"image": IMAGE, "prompt": "a watercolour of a lighthouse", **FAST, **fields}


def jpeg(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    image.load()
    return image


def assert_error(response: httpx.Response, status: int, *fragments: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()["error"]
    assert isinstance(message, str) and message and "Traceback" not in response.text
    for fragment in fragments:
        assert fragment in message, message
    return message


def expected_price(width: int, height: int, *, steps: int = 20, samples: int = 1) -> Decimal:
    exact = Decimal("0.008") * samples * steps / 20 * width * height / (1024 * 1024)
    return exact.quantize(Decimal("0.000001"))


def test_the_page_defaults_answer_a_jpeg_of_the_cropped_size_at_its_price(live: LiveServer) -> None:
    key = live.key("1")
    response = live.post({"image": IMAGE, "prompt": "a lighthouse"}, key=key, path=PATH)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    assert jpeg(response.content).size == (256, 184)
    cost = expected_price(256, 184)
    assert Decimal(response.headers["x-cost"]) == cost == Decimal("0.000359")
    assert Decimal(response.headers["x-remaining-credits"]) == Decimal(1) - cost == live.balance_of(key)
    assert response.headers["x-seed-value"] == "698845"  # the page's default seed
    # The v1 history row keeps the request's fields but not megabytes of image.
    row = JobStore(live.ledger.engine).get(response.headers["x-request-id"])
    assert row is not None and row.model == "sd3-med-img2img"
    assert row.params["image"] == f"<{len(IMAGE)} characters>" and row.params["prompt"] == "a lighthouse"


def test_the_same_request_gives_the_same_image_and_strength_changes_it(live: LiveServer) -> None:
    key = live.key()
    first = live.post(body(), key=key, path=PATH).content
    again = live.post(body(), key=key, path=PATH).content
    # (At 2 steps, 0.7 keeps the whole 2-step schedule, as int(2 / 0.7) = 2: 0.3 plans 6 and keeps 2.)
    weaker = live.post(body(strength=0.3), key=key, path=PATH).content
    assert first == again
    assert first != weaker


def test_strength_0_is_the_vae_round_trip_and_priced_like_any_request(live: LiveServer) -> None:
    key = live.key()
    a = live.post(body(strength=0, seed=1), key=key, path=PATH)
    b = live.post(body(strength=0, seed=2, prompt="anything else"), key=key, path=PATH)
    assert a.status_code == b.status_code == 200
    assert a.content == b.content  # no noise, no model: seed and prompt do not matter
    assert Decimal(a.headers["x-cost"]) == expected_price(256, 184, steps=2)


def test_seed_minus_1_is_drawn_and_reported(live: LiveServer) -> None:
    response = live.post(body(seed=-1), key=live.key(), path=PATH)
    assert response.status_code == 200
    seed = int(response.headers["x-seed-value"])
    assert 0 <= seed <= 999_999_999_999_999
    replay = live.post(body(seed=seed), key=live.key(), path=PATH)
    assert replay.content == response.content


@pytest.mark.parametrize("as_base64", [False, True])
def test_samples_answer_as_txt2img_does(live: LiveServer, as_base64: bool) -> None:
    response = live.post(body(samples=2, base64=as_base64), key=live.key(), path=PATH)
    assert response.status_code == 200
    payload = response.json()
    assert set(payload) == {"image", "images"} and len(payload["images"]) == 2
    assert payload["image"] == payload["images"][0] != payload["images"][1]
    assert jpeg(base64.b64decode(payload["images"][1])).size == (256, 184)
    assert Decimal(response.headers["x-cost"]) == expected_price(256, 184, steps=2, samples=2)


def test_base64_true_answers_json(live: LiveServer) -> None:
    response = live.post(body(base64=True), key=live.key(), path=PATH)
    assert set(response.json()) == {"image"}
    assert jpeg(base64.b64decode(response.json()["image"])).size == (256, 184)


def test_numbers_and_booleans_sent_as_strings_are_taken(live: LiveServer) -> None:
    lax = body(num_inference_steps="2", strength="0.5", guidance_scale="5", base64="false", seed="5")
    response = live.post(lax, key=live.key(), path=PATH)
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"


@pytest.mark.parametrize(
    ("sampler", "scheduler"),
    [("euler", "simple"), ("Euler_A", "normal"), ("DPM++ 2M Karras", "KARRAS"), ("euler_pp", "beta"),
     ("euler_ancestra", "sgm_uniform"), ("uni_pc_bh2", "ddim_uniform"), ("dpm_2", "exponential")],
)  # fmt: skip
def test_comfyui_names_labels_and_page_spellings_are_taken(
    live: LiveServer, sampler: str, scheduler: str
) -> None:
    response = live.post(body(sampler=sampler, scheduler=scheduler), key=live.key(), path=PATH)
    assert response.status_code == 200, response.text


def test_the_root_alias_and_a_data_uri(live: LiveServer) -> None:
    data_uri = "data:image/png;base64," + IMAGE
    response = live.post(body(image=data_uri), key=live.key(), path="/sd3-med-img2img")
    assert response.status_code == 200 and jpeg(response.content).size == (256, 184)


@pytest.mark.parametrize(
    ("fields", "fragments"),
    [
        ({"image": None}, ("image: is required",)),
        ({"prompt": "  "}, ("prompt: must not be empty",)),
        ({"strength": 1.5}, ("strength",)),
        ({"num_inference_steps": 101}, ("num_inference_steps",)),
        ({"guidance_scale": 21}, ("guidance_scale",)),
        ({"samples": 5}, ("samples",)),
        ({"sampler": "warp_drive"}, ("sampler: unknown sampler; accepted:", "dpmpp_2m")),
        ({"scheduler": "lunar"}, ("scheduler: unknown scheduler; accepted:", "sgm_uniform")),
        ({"image": "not an image!"}, ("image: is not base64",)),
        ({"image": base64.b64encode(b"GIF89a garbage").decode()}, ("image: could not be decoded",)),
        ({"image": png_b64(300, 40)}, ("image: 300x40 has a side under 64 px",)),
        ({"image": "https://example.com/cat.png"}, (URLS_OFF,)),
    ],
)
def test_bad_input_is_a_422_that_charges_nothing(
    live: LiveServer, fields: dict[str, object], fragments: tuple[str, ...]
) -> None:
    key = live.key("1")
    response = live.post({k: v for k, v in body(**fields).items() if v is not None}, key=key, path=PATH)
    assert_error(response, 422, *fragments)
    assert Decimal(response.headers["x-remaining-credits"]) == Decimal(1) == live.balance_of(key)


def test_checks_come_in_the_txt2img_order(live: LiveServer) -> None:
    bad_image = body(image="%%%")
    assert_error(live.post(bad_image, key=None, path=PATH), 401)
    wrong_type = httpx.post(
        live.base_url + PATH,
        content=b"image=x",
        headers={"x-api-key": live.key(), "content-type": "application/x-www-form-urlencoded"},
    )
    assert_error(wrong_type, 406, "Invalid content type")
    # A bad image is found before the credits are looked at: 422, not 406.
    poor = live.key("0")
    assert_error(live.post(bad_image, key=poor, path=PATH), 422, "image:")
    assert_error(live.post(body(), key=poor, path=PATH), 406, "Not enough credits")
    assert live.balance_of(poor) == 0


def test_an_image_body_may_exceed_the_json_body_limit_on_img2img_only(live: LiveServer) -> None:
    big = png_b64(720, 720, noise=True)  # ~2 MB of base64, over the 1 MiB limit of other routes
    assert len(big) > live.settings.limits.max_body_bytes
    response = live.post(body(image=big, strength=0), key=live.key(), path=PATH)
    assert response.status_code == 200, response.text
    assert jpeg(response.content).size == (720, 720)
    txt2img = live.post(
        {"prompt": "x", "padding": big}, key=live.key(), path="/v1/stable-diffusion-3-medium-txt2img"
    )
    assert_error(txt2img, 413, "Request body too large")
    # img2img's own limit: 1 MiB plus the base64 of a 20 MB image, refused before it is read.
    limits = live.settings.limits
    limit = limits.max_body_bytes + -(-limits.image_max_bytes // 3) * 4
    huge = live.post(body(image="A" * limit), key=live.key(), path=PATH)
    assert_error(huge, 413, f"the limit is {limit} bytes")


def test_v2_runs_img2img_and_refuses_a_bad_image_at_the_door(live: LiveServer) -> None:
    key = live.key("1")
    headers = {"x-api-key": key}
    refused = live.post(body(image="@@@"), key=key, path="/v2/sd3-med-img2img")
    assert_error(refused, 422, "image:")
    history = httpx.get(f"{live.base_url}/v1/history", headers=headers).json()["items"]
    assert history == []  # no job was created, nothing reserved
    assert live.balance_of(key) == Decimal(1)

    submitted = live.post(body(seed=77), key=key, path="/v2/sd3-med-img2img")
    assert submitted.status_code == 200, submitted.text
    status_url = submitted.json()["status_url"]
    assert wait_for(lambda: httpx.get(status_url, headers=headers).json()["status"] == "COMPLETED", 120)
    result = httpx.get(submitted.json()["response_url"], headers=headers).json()
    assert result["seed"] == 77 and result["metrics"]["cost"] == float(expected_price(256, 184, steps=2))
    output = httpx.get(result["output"], headers=headers)
    v1 = live.post(body(seed=77), key=live.key(), path=PATH)
    assert output.content == v1.content  # the same image through either surface
    item = httpx.get(f"{live.base_url}/v1/history", headers=headers).json()["items"][0]
    assert item["model_name"] == "sd3-med-img2img" and item["status"] == "COMPLETED"
    assert item["request_body"]["image"] == f"<{len(IMAGE)} characters>"  # never echoed whole
    assert item["request_body"]["strength"] == 0.7
    # Kept whole only while the job could still need a restart to rebuild it.
    stored = live.app.state.serving.jobs.get(submitted.json()["request_id"])
    assert stored is not None and stored.params["image"] == f"<{len(IMAGE)} characters>"


def test_a_fixture_photo_with_exif_comes_out_upright(live: LiveServer) -> None:
    photo = base64.b64encode((IMAGES / "rotated_exif.jpg").read_bytes()).decode()
    response = live.post(body(image=photo, strength=0), key=live.key(), path=PATH)
    assert jpeg(response.content).size == (96, 72)  # stored 72x96, shown (and served) 96x72


def test_an_accepted_img2img_job_left_by_a_stopped_server_runs_at_the_next_start(
    settings: Settings, runtime: Runtime, tmp_path: Path
) -> None:
    """Recovery rebuilds the job from its recorded body, image included; one whose image is no longer
    taken is refunded and failed, and does not stop the others."""
    url = migrated(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    ledger = Ledger(url)
    store = JobStore(ledger.engine)
    record, key = ledger.create_key(name="left", credits=Decimal(1))
    good = Img2ImgRequest.model_validate(body(seed=9)).model_dump(mode="json")
    bad = {**good, "image": "@@@"}
    for request_id, params in (("left-good", good), ("left-bad", bad)):
        ledger.reserve(key_id=record.id, amount=Decimal("0.01"), request_id=request_id, owner="old-me")
        store.create(
            request_id=request_id,
            key_id=record.id,
            surface="v2",
            model="sd3-med-img2img",
            params=params,
            cost=Decimal("0.01"),
            owner="old-me",
        )
    restarted = settings.model_copy(update={"database_url": url, "instance_id": "old-me"})
    servers = live_server(restarted, runtime)
    live = next(servers)  # its start-up runs the recovery
    try:
        headers = {"x-api-key": key}
        status = f"{live.base_url}/v2/requests/left-good/status"
        assert wait_for(lambda: httpx.get(status, headers=headers).json()["status"] == "COMPLETED", 120)
        result = httpx.get(f"{live.base_url}/v2/requests/left-good", headers=headers).json()
        assert result["seed"] == 9 and result["metrics"]["cost"] == 0.01  # the price it was charged
        bad_status = httpx.get(f"{live.base_url}/v2/requests/left-bad/status", headers=headers)
        assert bad_status.json()["status"] == "FAILED"
        assert ledger.charge("left-bad") == "refunded" and ledger.charge("left-good") == "settled"
        assert live.balance_of(key) == Decimal("0.99")
    finally:
        servers.close()
        ledger.close()


def test_the_schedulers_list_says_what_each_slug_takes(live: LiveServer) -> None:
    listing = httpx.get(f"{live.base_url}/v1/schedulers").json()
    img2img = listing["models"]["sd3-med-img2img"]
    assert img2img["sampler"]["default"] == "dpmpp_2m" and img2img["scheduler"]["default"] == "sgm_uniform"
    page_samplers = [
        "euler",
        "euler_pp",
        "euler_ancestral",
        "euler_ancestral_pp",
        "heun",
        "heunpp2",
        "dpm_2",
        "dpm_2_ancestral",
        "lms",
        "dpm_fast",
        "dpm_adaptive",
        "dpmpp_2s_ancestral",
        "dpmpp_sde",
        "dpmpp_sde_gpu",
        "dpmpp_2m",
        "dpmpp_2m_sde",
        "dpmpp_2m_sde_gpu",
        "dpmpp_3m_sde",
        "dpmpp_3m_sde_gpu",
        "ddpm",
        "lcm",
        "ipndm",
        "ipndm_v",
        "deis",
        "ddim",
        "uni_pc",
        "uni_pc_bh2",
    ]
    assert len(page_samplers) == 27 and set(page_samplers) <= set(img2img["sampler"]["accepted"])
    page_schedules = {"normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform"}
    assert page_schedules <= set(img2img["scheduler"]["accepted"])
    assert listing["models"]["stable-diffusion-3-medium-txt2img"]["scheduler"]["default"] == "DPM++ 2M"
