"""The playground page at `/`, driven in a real headless Chromium against a live server.

Chromium and chromedriver come from Debian (`.ci/browser.sh` installs them); nothing is
downloaded by the test. Without them the test is skipped on a developer machine and fails in CI
(`CI` set), where a skipped browser test would hide a broken page.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.config import PricingSettings, Settings
from server.pricing import price_of, sd35_price
from server.schemas import IMG2IMG_SLUG, SD35_LARGE_SLUG, SD35_TURBO_SLUG, SLUG
from tests.live import LiveServer, twin_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
GENERATION_TIMEOUT_S = 120


def _unavailable() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is not installed (pip install selenium)"
    for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)):
        if not os.access(path, os.X_OK):
            return f"{name} is not installed at {path} (run .ci/browser.sh, which installs it from Debian)"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    reason = _unavailable()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"browser test cannot run in CI: {reason}")
        pytest.skip(reason)

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root in a container, where the sandbox cannot start
        "--disable-gpu",
        "--disable-dev-shm-usage",  # small /dev/shm in containers crashes tabs
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    with pytest.MonkeyPatch.context() as env:
        # Never let Selenium Manager look for (or download) a browser or driver: both are given.
        env.setenv("SE_OFFLINE", "true")
        driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any, condition: Any, timeout: float = 15) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def _fill(driver: Any, element_id: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(text)


def _open(driver: Any, live: LiveServer) -> None:
    from selenium.webdriver.common.by import By

    driver.get(live.base_url + "/")
    # The scheduler list comes from GET /v1/schedulers once the script runs.
    _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#scheduler option")) > 1)


def _enter_key(driver: Any, key: str) -> None:
    from selenium.webdriver.common.keys import Keys

    _fill(driver, "api-key", key)
    driver.find_element("id", "api-key").send_keys(Keys.TAB)  # "change" fires when the field is left


def _text(driver: Any, element_id: str) -> str:
    return str(driver.find_element("id", element_id).text).strip()


@pytest.mark.browser
def test_generate_shows_the_image_seed_cost_and_remaining_credits(
    browser: Any, live: LiveServer, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    key = live.key("10")
    _open(browser, live)
    _enter_key(browser, key)
    _wait(browser, lambda d: _text(d, "credits") == "10")

    _fill(browser, "prompt", "a watercolor of a lighthouse")
    _fill(browser, "negative-prompt", "blurry")
    _fill(browser, "width", "512")
    _fill(browser, "height", "512")
    _fill(browser, "steps", "10")
    _fill(browser, "seed", "42")
    browser.find_element(By.ID, "generate").click()

    image = _wait(
        browser,
        lambda d: next(
            (
                el
                for el in d.find_elements(By.ID, "image-0")
                if d.execute_script("return arguments[0].complete", el)
            ),
            False,
        ),
        timeout=GENERATION_TIMEOUT_S,
    )
    assert str(image.get_attribute("src")).startswith("data:image/jpeg;base64,/9j/")  # JPEG magic, base64
    size = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
    assert size == [512, 512]

    price = price_of(width=512, height=512, steps=10, samples=1, pricing=PricingSettings())
    assert _text(browser, "seed-used") == "42"
    assert Decimal(_text(browser, "cost")) == price
    shown = Decimal(_text(browser, "credits"))
    assert shown < Decimal("10")
    assert shown == Decimal(_text(browser, "remaining")) == live.balance_of(key) == Decimal("10") - price
    assert not browser.find_element(By.ID, "error").is_displayed()

    # Nothing but this server was contacted (no CDN, fonts or analytics).
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(str(url).startswith(live.base_url + "/") for url in loaded)

    screenshot = tmp_path / "playground.png"
    assert browser.save_screenshot(str(screenshot))
    data = screenshot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 20_000


@pytest.mark.browser
def test_the_key_is_remembered_and_errors_are_shown(browser: Any, live: LiveServer) -> None:
    from selenium.webdriver.common.by import By

    _open(browser, live)
    _enter_key(browser, "sd3_wrong-key")
    # The credit check already reports the bad key.
    _wait(browser, lambda d: "Unauthorized" in _text(d, "error"))

    browser.refresh()
    _wait(browser, lambda d: d.find_element(By.ID, "api-key").get_attribute("value") == "sd3_wrong-key")

    # A valid key with too little for the asked request: the server's message is shown, nothing charged.
    key = live.key("0.001")
    _enter_key(browser, key)
    _wait(browser, lambda d: _text(d, "credits") == "0.001")
    _fill(browser, "prompt", "a fox")
    _fill(browser, "width", "1024")
    _fill(browser, "height", "1024")
    browser.find_element(By.ID, "generate").click()
    _wait(browser, lambda d: "Not enough credits" in _text(d, "error"))
    assert _text(browser, "credits") == "0.001"
    assert live.balance_of(key) == Decimal("0.001")


@pytest.mark.browser
def test_an_uploaded_image_runs_img2img_at_its_size(browser: Any, live: LiveServer) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    key = live.key("1")
    _open(browser, live)
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#schedule option")) > 1)
    _enter_key(browser, key)
    _wait(browser, lambda d: _text(d, "credits") == "1")
    assert not browser.find_element(By.ID, "strength").is_displayed()  # txt2img until an image is chosen

    picture = Path(__file__).parent.parent / "data" / "images" / "rotated_exif.jpg"
    browser.find_element(By.ID, "init-image").send_keys(str(picture))
    _wait(browser, lambda d: d.find_element(By.ID, "strength").is_displayed())
    assert not browser.find_element(By.ID, "width").is_enabled()
    _fill(browser, "prompt", "a harbour at dusk")
    _fill(browser, "steps", "3")
    _fill(browser, "seed", "8")
    _fill(browser, "strength", "0.6")
    Select(browser.find_element(By.ID, "schedule")).select_by_value("simple")
    browser.find_element(By.ID, "generate").click()

    image = _wait(
        browser,
        lambda d: next(
            (
                el
                for el in d.find_elements(By.ID, "image-0")
                if d.execute_script("return arguments[0].complete", el)
            ),
            False,
        ),
        timeout=GENERATION_TIMEOUT_S,
    )
    size = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
    assert size == [96, 72]  # the photo's upright size, not the width and height fields
    cost = Decimal(_text(browser, "cost"))
    assert cost == Decimal("0.000008")  # 0.008 × 3/20 × 96·72/1024², rounded to 6 decimals
    assert live.balance_of(key) == Decimal(1) - cost
    history = httpx.get(f"{live.base_url}/v1/history", headers={"x-api-key": key}).json()["items"]
    assert history[0]["model_name"] == "sd3-med-img2img"
    assert history[0]["request_body"]["scheduler"] == "simple"


def test_the_page_loads_nothing_from_elsewhere(live: LiveServer) -> None:
    # Checked without a browser too, so that it holds where Chromium is not installed.
    page = httpx.get(live.base_url + "/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    for asset in ("playground.js", "playground.css"):
        assert httpx.get(f"{live.base_url}/playground/{asset}", timeout=30).status_code == 200
    assert "http://" not in page.text and "https://" not in page.text
    assert httpx.get(f"{live.base_url}/playground/..%2Fapp.py", timeout=30).status_code == 404


# -- what the page is told to call: the served slugs, in their own field names ----------------------


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory, settings: Settings) -> Iterator[LiveServer]:
    yield from twin_server(tmp_path_factory, settings, "tiny:sd3.5-large")


@pytest.fixture(scope="module")
def turbo(tmp_path_factory: pytest.TempPathFactory, settings: Settings) -> Iterator[LiveServer]:
    yield from twin_server(tmp_path_factory, settings, "tiny:sd3.5-large-turbo")


def page_models(server: LiveServer) -> dict[str, Any]:
    response = httpx.get(f"{server.base_url}/playground/models.json", timeout=30)
    assert response.status_code == 200
    assert "default-src 'none'" in response.headers["content-security-policy"]
    return dict(response.json())


def test_on_sd3_medium_the_page_calls_txt2img_and_img2img_in_their_own_names(live: LiveServer) -> None:
    models = page_models(live)
    assert (models["family"], models["title"]) == ("sd3-medium", "Stable Diffusion 3 Medium")
    txt2img, img2img = models["txt2img"], models["img2img"]
    assert txt2img["path"] == f"/v1/{SLUG}" and img2img["path"] == f"/v1/{IMG2IMG_SLUG}"
    fields = txt2img["fields"]
    assert fields["steps"] == {"name": "num_inference_steps", "default": 25, "minimum": 10, "maximum": 100}
    assert fields["width"] == {
        "name": "img_width",
        "default": 1024,
        "minimum": 512,
        "maximum": 2048,
        "multipleOf": 8,
    }
    assert (fields["samples"]["name"], fields["guidance"]["default"], fields["seed"]["default"]) == (
        "samples",
        5.0,
        -1,
    )
    assert fields["scheduler"]["name"] == "scheduler" and fields["scheduler"]["default"] == "DPM++ 2M"
    assert "schedule" not in fields  # SD3 txt2img names sampler and schedule in one field
    own = img2img["fields"]
    assert (own["scheduler"]["name"], own["schedule"]["name"]) == ("sampler", "scheduler")
    assert own["strength"] == {"name": "strength", "default": 0.7, "minimum": 0, "maximum": 1}
    assert "width" not in own and own["steps"]["minimum"] == 1


@pytest.mark.parametrize(
    ("server", "slug", "steps", "guidance"),
    [("large", SD35_LARGE_SLUG, (30, 10), 5.5), ("turbo", SD35_TURBO_SLUG, (4, 1), 1.0)],
)
def test_on_sd35_the_page_calls_the_served_slug_with_its_fields_and_defaults(
    request: pytest.FixtureRequest, server: str, slug: str, steps: tuple[int, int], guidance: float
) -> None:
    live: LiveServer = request.getfixturevalue(server)
    models = page_models(live)
    assert models["img2img"] is None  # no img2img slug on SD3.5: the page hides the image input
    txt2img = models["txt2img"]
    assert (txt2img["slug"], txt2img["path"]) == (slug, f"/v1/{slug}")
    fields = txt2img["fields"]
    assert fields["steps"] == {"name": "steps", "default": steps[0], "minimum": steps[1], "maximum": 70}
    assert fields["guidance"] == {"name": "guidance_scale", "default": guidance, "minimum": 1, "maximum": 15}
    assert fields["width"] == {"name": "width", "default": 1024, "minimum": 64, "maximum": 2048}
    assert fields["samples"]["name"] == "batch_size" and fields["seed"]["default"] == 98552302
    assert fields["negative-prompt"] == {"name": "negative_prompt", "default": "low quality, blurry"}
    assert (fields["scheduler"]["name"], fields["scheduler"]["default"]) == ("sampler", "euler")
    assert (fields["schedule"]["name"], fields["schedule"]["default"]) == ("scheduler", "sgm_uniform")
    assert "beta" in fields["schedule"]["accepted"] and "DPM++ 2M" in fields["scheduler"]["accepted"]
    # The path is answered here (401 without a key, not the 404 of a slug served elsewhere).
    assert httpx.post(live.base_url + txt2img["path"], json={"prompt": "a"}, timeout=30).status_code == 401


def test_the_page_posts_where_and_what_models_json_says(live: LiveServer) -> None:
    # The script names no slug and no body field of its own: both come from models.json.
    script = httpx.get(f"{live.base_url}/playground/playground.js", timeout=30).text
    assert "/playground/models.json" in script
    wire_names = ("num_inference_steps", "img_width", "img_height", "batch_size", "guidance_scale")
    for name in (SLUG, IMG2IMG_SLUG, SD35_LARGE_SLUG, SD35_TURBO_SLUG, *wire_names):
        assert name not in script, name
    page = httpx.get(f"{live.base_url}/", timeout=30).text
    assert 'id="generate" type="submit" disabled' in page  # until the page knows what to call


@pytest.mark.browser
def test_on_sd35_turbo_the_page_generates_with_the_turbo_slug(browser: Any, turbo: LiveServer) -> None:
    from selenium.webdriver.common.by import By

    key = turbo.key("10")
    _open(browser, turbo)
    _wait(browser, lambda d: d.find_element(By.ID, "generate").is_enabled())
    assert _text(browser, "title") == "Stable Diffusion 3.5 Large Turbo"
    assert browser.find_element(By.ID, "steps").get_attribute("value") == "4"
    assert browser.find_element(By.ID, "guidance").get_attribute("value") == "1"
    assert _text(browser, "calls") == f"POST /v1/{SD35_TURBO_SLUG}"
    assert not browser.find_element(By.ID, "init-image").is_displayed()  # no img2img on SD3.5
    assert browser.find_element(By.ID, "schedule").is_displayed()  # SD3.5 names the schedule apart
    _enter_key(browser, key)
    _wait(browser, lambda d: _text(d, "credits") == "10")

    _fill(browser, "prompt", "a lighthouse")
    _fill(browser, "width", "64")
    _fill(browser, "height", "64")
    _fill(browser, "steps", "2")
    _fill(browser, "samples", "2")
    browser.find_element(By.ID, "generate").click()
    _wait(
        browser,
        lambda d: (
            d.find_elements(By.ID, "image-1")
            and d.execute_script("return arguments[0].complete", d.find_element(By.ID, "image-1"))
        ),
        timeout=GENERATION_TIMEOUT_S,
    )
    image = browser.find_element(By.ID, "image-0")
    size = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
    assert size == [64, 64]
    price = sd35_price(
        slug=SD35_TURBO_SLUG, width=64, height=64, steps=2, images=2, pricing=PricingSettings()
    )
    assert Decimal(_text(browser, "cost")) == price
    assert _text(browser, "seed-used") == "98552302"  # the slug's default seed
    history = httpx.get(f"{turbo.base_url}/v1/history", headers={"x-api-key": key}).json()["items"]
    assert history[0]["model_name"] == SD35_TURBO_SLUG
    body = history[0]["request_body"]
    assert (body["steps"], body["batch_size"], body["width"], body["guidance_scale"]) == (2, 2, 64, 1.0)
    assert (body["sampler"], body["scheduler"]) == ("euler", "sgm_uniform")
