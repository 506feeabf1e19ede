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
from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from server.api.deps import ServingDep, validated_json
from server.api.renderers import SegmindRoute
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

router = APIRouter(prefix="/admin", include_in_schema=True, tags=["admin"], route_class=SegmindRoute)


class NewKey(BaseModel):
    name: str = Field(min_length=1, max_length=128)
    credits: str = "0"


class Grant(BaseModel):
    amount: str


async def admin_ledger(request: Request, serving: ServingDep) -> Ledger:
    """The ledger, to a caller with the admin token; without a configured token, no such route."""
    token = serving.settings.admin_token
    if token is None:
        raise NotFound()
    sent = request.headers.get("x-admin-token") or request.headers.get("authorization", "").removeprefix(
        "Bearer "
    )
    if not sent or not hmac.compare_digest(sent.encode(), token.get_secret_value().encode()):
        raise Unauthorized("Unauthorized: this needs the admin token")
    return serving.ledger


AdminLedger = Annotated[Ledger, Depends(admin_ledger)]


# The bodies are read after the token is checked: 404/401 win over 422. An empty body is `{}`.
async def new_key_body(request: Request, _ledger: AdminLedger) -> NewKey:
    return await validated_json(request, NewKey, when_empty=b"{}")


async def grant_body(request: Request, _ledger: AdminLedger) -> Grant:
    return await validated_json(request, Grant, when_empty=b"{}")


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
async def create_key(ledger: AdminLedger, body: Annotated[NewKey, Depends(new_key_body)]) -> dict[str, Any]:
    amount = _amount("credits", body.credits)
    try:
        record, key = await to_thread.run_sync(lambda: ledger.create_key(name=body.name, credits=amount))
    except KeyNameTaken:
        raise InvalidRequest(f"name: a key named {body.name!r} already exists") from None
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    return {**_key_json(record), "key": key}  # the only time the key is shown


@router.get("/keys")
async def list_keys(ledger: AdminLedger) -> dict[str, Any]:
    records = await to_thread.run_sync(ledger.list_keys)
    return {"keys": [_key_json(record) for record in records]}


async def _set_enabled(ledger: Ledger, name: str, enabled: bool) -> dict[str, Any]:
    try:
        await to_thread.run_sync(lambda: ledger.set_enabled(name, enabled))
    except UnknownKey:
        raise NotFound(f"No key named {name!r}") from None
    return {"name": name, "enabled": enabled}


@router.post("/keys/{name:path}/disable")
async def disable_key(ledger: AdminLedger, name: str) -> dict[str, Any]:
    return await _set_enabled(ledger, name, False)


@router.post("/keys/{name:path}/enable")
async def enable_key(ledger: AdminLedger, name: str) -> dict[str, Any]:
    return await _set_enabled(ledger, name, True)


@router.post("/keys/{name:path}/credits")
async def add_credits(
    ledger: AdminLedger, name: str, body: Annotated[Grant, Depends(grant_body)]
) -> dict[str, Any]:
    amount = _amount("amount", body.amount)
    try:
        balance = await to_thread.run_sync(lambda: ledger.add_credits(name, amount, note="admin api"))
    except UnknownKey:
        raise NotFound(f"No key named {name!r}") from None
    except (BalanceLimitExceeded, ValueError) as exc:
        raise InvalidRequest(f"amount: {exc}") from None
    return {"name": name, "credits": format_credits(balance)}


@router.get("/audit")
async def audit(ledger: AdminLedger) -> dict[str, Any]:
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
