"""Schemathesis fuzzes every operation of our OpenAPI schema against a live server.

What must hold for every generated request, valid or not: no 5xx, every error a JSON body with an
error message, and not one credit charged. The key used has a zero balance, so a valid
generation request ends in 406 before any device work: the fuzzer explores validation, auth and
routing thoroughly (thousands of cases) without spending minutes generating images.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from decimal import Decimal

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from pydantic import SecretStr
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.core.result import Ok

from server.config import Settings
from server.runtime import Runtime
from tests.live import LiveServer, live_server

ADMIN = "fuzz-admin-token"
# Up to this many generated requests per operation and mode (~20 operations x 2 modes): thousands.
EXAMPLES = 250


@pytest.fixture(scope="module")
def fuzzed(
    settings: Settings, runtime: Runtime, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    db = tmp_path_factory.mktemp("fuzz") / "ledger.sqlite3"
    custom = settings.model_copy(update={"database_url": f"sqlite:///{db}", "admin_token": SecretStr(ADMIN)})
    yield from live_server(custom, runtime)


@pytest.fixture(scope="module")
def broke_key(fuzzed: LiveServer) -> str:
    return fuzzed.key("0")


def operations(base_url: str) -> list[APIOperation]:
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    found = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()  # an operation whose schema schemathesis cannot read
        found.append(result.ok())
    return found


@pytest.mark.slow
def test_no_request_gets_a_5xx_or_a_non_json_error_or_a_charge(fuzzed: LiveServer, broke_key: str) -> None:
    # Hypothesis driven directly (not schemathesis' pytest plugin, which does not follow pytest 9):
    # one property per operation, EXAMPLES generated requests each.
    headers = {"x-api-key": broke_key, "authorization": f"Bearer {broke_key}", "x-admin-token": ADMIN}
    tried: dict[str, int] = {}
    for operation, mode in itertools.product(operations(fuzzed.base_url), GenerationMode):
        # Positive: requests that fit the schema; negative: requests that break it on purpose.

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def holds(case: Case) -> None:
            sent = {**case.headers, **headers} if case.headers is not None else dict(headers)
            response = case.call(headers=sent, timeout=30)
            where = (case.method, case.formatted_path, response.status_code, response.text[:300])
            assert response.status_code < 500, where
            if response.status_code >= 400:
                error = response.json().get("error")
                # Segmind's shape {"error": "..."}; the OpenAI surface's {"error": {"message": ...}}.
                message = error.get("message") if isinstance(error, dict) else error
                assert isinstance(message, str) and message, where
                assert "Traceback" not in response.text, where
            tried[case.operation.label] = tried.get(case.operation.label, 0) + 1

        try:
            holds()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # nothing to break in an operation without inputs
    assert fuzzed.balance_of(broke_key) == Decimal("0")
    assert len(tried) >= 15 and sum(tried.values()) >= 2000, tried
    print(f"fuzzed {sum(tried.values())} requests over {len(tried)} operations")


def test_the_books_still_balance_after_fuzzing(fuzzed: LiveServer) -> None:
    assert all(row.ok and row.open_reservations == 0 for row in fuzzed.ledger.audit())
