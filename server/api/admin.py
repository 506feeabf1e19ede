"""Key management over HTTP for operators: create, list, enable/disable keys, add credits, audit.

Behind the admin token of the settings (`Authorization: Bearer <token>` or `x-admin-token`),
compared in constant time. Without a configured token these routes answer 404, as if they did not
exist: an operator turns them on deliberately. Users' API keys never open them.

A key's name is the rest of the path before the action (`{name:path}`), so every name the CLI
accepts, `/` included, can be managed here too; percent-encode what a URL cannot carry as is.
"""

from __future__ import annotations

import hmac
from decimal import Decimal
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, ValidationError

from server.credits import InvalidAmount, format_credits, parse_credits
from server.errors import (
    BalanceLimitExceeded,
    InvalidRequest,
    KeyNameTaken,
    NotFound,
    Unauthorized,
    UnknownKey,
)
from server.ledger import KeyRecord, Ledger

router = APIRouter(prefix="/admin", include_in_schema=True, tags=["admin"])


class NewKey(BaseModel):
    name: str = Field(min_length=1, max_length=128)
    credits: str = "0"


class Grant(BaseModel):
    amount: str


def _ledger(request: Request) -> Ledger:
    token = request.app.state.serving.settings.admin_token
    if token is None:
        raise NotFound()
    sent = request.headers.get("x-admin-token") or request.headers.get("authorization", "").removeprefix(
        "Bearer "
    )
    if not sent or not hmac.compare_digest(sent.encode(), token.get_secret_value().encode()):
        raise Unauthorized("Unauthorized: this needs the admin token")
    return request.app.state.serving.ledger  # type: ignore[no-any-return]


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    try:
        return model.model_validate_json(await request.body() or b"{}")
    except ValidationError as exc:
        from server.schemas import describe_validation_errors

        raise InvalidRequest(describe_validation_errors(exc.errors())) from None


def _amount(field: str, text: str) -> Decimal:
    try:
        return parse_credits(text)
    except InvalidAmount as exc:
        raise InvalidRequest(f"{field}: {exc}") from None


def _key_json(record: KeyRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "prefix": record.prefix,
        "enabled": record.enabled,
        "credits": format_credits(record.balance),
        "created_at": record.created_at.isoformat(),
    }


@router.post("/keys")
async def create_key(request: Request) -> dict[str, Any]:
    ledger = _ledger(request)
    body: NewKey = await _parse(request, NewKey)
    amount = _amount("credits", body.credits)
    try:
        record, key = await to_thread.run_sync(lambda: ledger.create_key(name=body.name, credits=amount))
    except KeyNameTaken:
        raise InvalidRequest(f"name: a key named {body.name!r} already exists") from None
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    return {**_key_json(record), "key": key}  # the only time the key is shown


@router.get("/keys")
async def list_keys(request: Request) -> dict[str, Any]:
    ledger = _ledger(request)
    records = await to_thread.run_sync(ledger.list_keys)
    return {"keys": [_key_json(record) for record in records]}


async def _set_enabled(request: Request, name: str, enabled: bool) -> dict[str, Any]:
    ledger = _ledger(request)
    try:
        await to_thread.run_sync(lambda: ledger.set_enabled(name, enabled))
    except UnknownKey:
        raise NotFound(f"No key named {name!r}") from None
    return {"name": name, "enabled": enabled}


@router.post("/keys/{name:path}/disable")
async def disable_key(request: Request, name: str) -> dict[str, Any]:
    return await _set_enabled(request, name, False)


@router.post("/keys/{name:path}/enable")
async def enable_key(request: Request, name: str) -> dict[str, Any]:
    return await _set_enabled(request, name, True)


@router.post("/keys/{name:path}/credits")
async def add_credits(request: Request, name: str) -> dict[str, Any]:
    ledger = _ledger(request)
    body: Grant = await _parse(request, Grant)
    amount = _amount("amount", body.amount)
    try:
        balance = await to_thread.run_sync(lambda: ledger.add_credits(name, amount, note="admin api"))
    except UnknownKey:
        raise NotFound(f"No key named {name!r}") from None
    except (BalanceLimitExceeded, ValueError) as exc:
        raise InvalidRequest(f"amount: {exc}") from None
    return {"name": name, "credits": format_credits(balance)}


@router.get("/audit")
async def audit(request: Request) -> dict[str, Any]:
    ledger = _ledger(request)
    rows = await to_thread.run_sync(ledger.audit)
    return {
        "ok": all(row.ok for row in rows),
        "keys": [
            {
                "name": row.name,
                "granted": format_credits(row.granted),
                "charged": format_credits(row.charged),
                "credits": format_credits(row.balance),
                "open_reservations": row.open_reservations,
                "stale_reservations": row.stale_reservations,
                "ok": row.ok,
            }
            for row in rows
        ],
    }
