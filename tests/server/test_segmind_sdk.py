"""The official `segmind` Python SDK works against the server by changing only its base URL."""

from __future__ import annotations

import base64
import io
from decimal import Decimal
from pathlib import Path

import pytest
from PIL import Image
from segmind.exceptions import SegmindError

from tests.conftest import SDK
from tests.live import SLUG, SMALL, LiveServer


def test_run_sync_returns_the_jpeg(live: LiveServer, sdk: SDK) -> None:
    key = live.key("1")
    client = sdk(api_key=key, base_url=f"{live.base_url}/v1", timeout=120)
    response = client.run_sync(SLUG, prompt="a panda astronaut", seed=468685, **SMALL)
    assert response.status_code == 200
    assert Image.open(io.BytesIO(response.content)).size == (512, 512)
    assert Decimal(response.headers["x-remaining-credits"]) == Decimal("0.9961")


def test_run_sync_with_base64_and_a_base_url_without_v1(live: LiveServer, sdk: SDK) -> None:
    client = sdk(api_key=live.key(), base_url=live.base_url, timeout=120)
    payload = client.run_sync(SLUG, prompt="a panda", base64=True, **SMALL).json()
    assert Image.open(io.BytesIO(base64.b64decode(payload["image"]))).format == "JPEG"


def test_sdk_errors_carry_the_status_and_message(live: LiveServer, sdk: SDK) -> None:
    client = sdk(api_key="sd3_wrong", base_url=f"{live.base_url}/v1", timeout=120)
    with pytest.raises(SegmindError) as caught:
        client.run_sync(SLUG, prompt="a panda", **SMALL)
    assert caught.value.status == 401
    assert "API key is invalid" in (caught.value.detail or "")

    poor = sdk(api_key=live.key("0.001"), base_url=f"{live.base_url}/v1", timeout=120)
    with pytest.raises(SegmindError) as caught:
        poor.run_sync(SLUG, prompt="a panda", **SMALL)
    assert caught.value.status == 406 and caught.value.detail and "Not enough credits" in caught.value.detail


def test_img2img_through_the_sdk_run_sync_and_v2_run(live: LiveServer, sdk: SDK) -> None:
    """The SDK sends an img2img body like any other: base64 image in, JPEG out, or a v2 job's output URL."""
    picture = Path(__file__).parent.parent / "data" / "images" / "landscape.png"
    image = base64.b64encode(picture.read_bytes()).decode()
    client = sdk(api_key=live.key("1"), base_url=f"{live.base_url}/v1", timeout=120)
    fields = {"image": image, "prompt": "a meadow", "num_inference_steps": 2, "seed": 4}
    response = client.run_sync("sd3-med-img2img", **fields)
    assert response.status_code == 200
    assert Image.open(io.BytesIO(response.content)).size == (96, 72)
    result = client.run("sd3-med-img2img", **fields)
    assert result["status"] == "COMPLETED" and result["seed"] == 4
    assert str(result["output"]).endswith(".jpg")
