"""One taxonomy, two wire formats: the router a route belongs to decides how its errors look.

A small app of the server's own parts (route classes, handlers, request-id middleware) with routes
that fail on purpose; the surfaces' real errors over HTTP are in test_txt2img_http.py and
test_openai.py.
"""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from fastapi import APIRouter, FastAPI, Request
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from server.api.renderers import OpenAIRoute, SegmindRoute, install_error_handlers
from server.errors import InvalidRequest, RateLimited
from server.headers import remember_balance
from server.logs import RequestContext


def failing_routes(router: APIRouter) -> APIRouter:
    @router.get("/invalid")
    async def invalid(request: Request) -> None:
        remember_balance(request, Decimal("1.5"))  # an authenticated request
        raise InvalidRequest("n: must be at most 4", param="n")

    @router.get("/limited")
    async def limited() -> None:
        raise RateLimited(headers={"Retry-After": "7"})

    @router.get("/database")
    async def database() -> None:
        raise OperationalError("SELECT 1", {}, Exception("database is locked"))

    @router.get("/bug")
    async def bug(request: Request) -> None:
        remember_balance(request, Decimal("2"))
        raise RuntimeError("a bug no handler knows")

    return router


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(RequestContext)
    app.include_router(failing_routes(APIRouter(prefix="/segmind", route_class=SegmindRoute)))
    app.include_router(failing_routes(APIRouter(prefix="/openai", route_class=OpenAIRoute)))
    return TestClient(app, raise_server_exceptions=False)


def test_invalid_input_is_segminds_422_or_openais_400_naming_the_field(client: TestClient) -> None:
    segmind = client.get("/segmind/invalid")
    assert segmind.status_code == 422
    assert segmind.json() == {"error": "n: must be at most 4"}
    openai = client.get("/openai/invalid")
    assert openai.status_code == 400
    assert openai.json() == {
        "error": {
            "message": "n: must be at most 4",
            "type": "invalid_request_error",
            "param": "n",
            "code": "invalid_value",
        }
    }
    for response in (segmind, openai):
        assert response.headers["x-remaining-credits"] == "1.5"


def test_an_errors_own_headers_come_with_either_format(client: TestClient) -> None:
    for prefix in ("segmind", "openai"):
        response = client.get(f"/{prefix}/limited")
        assert response.status_code == 429 and response.headers["retry-after"] == "7"
    assert client.get("/openai/limited").json()["error"]["code"] == "rate_limit_exceeded"


def test_a_database_failure_is_a_503_in_the_routers_format(client: TestClient) -> None:
    segmind = client.get("/segmind/database")
    openai = client.get("/openai/database")
    assert segmind.status_code == openai.status_code == 503
    assert segmind.headers["retry-after"] == openai.headers["retry-after"] == "5"
    assert "database" in segmind.json()["error"]
    assert "database" in openai.json()["error"]["message"]
    assert "SELECT" not in segmind.text + openai.text


def test_a_bug_is_a_json_500_inside_the_middleware_with_the_contract_headers(client: TestClient) -> None:
    for prefix in ("segmind", "openai"):
        response = client.get(f"/{prefix}/bug")
        assert response.status_code == 500 and response.headers["content-type"] == "application/json"
        assert "a bug no handler knows" not in response.text
        # Answered inside the middleware: the request id names it in body and header alike, and the
        # balance header of an authenticated request is kept.
        request_id = response.headers["x-request-id"]
        assert re.search(rf"Internal server error \(request {request_id}", response.text)
        assert response.headers["x-remaining-credits"] == "2"


def test_outside_any_route_the_answer_is_segminds(client: TestClient) -> None:
    response = client.get("/openai/no-such-thing")
    assert response.status_code == 404 and isinstance(response.json()["error"], str)
    wrong_method = client.post("/openai/invalid")
    assert wrong_method.status_code == 405
    assert "POST is not allowed" in wrong_method.json()["error"]
