"""Key management over HTTP for operators: create, list, enable/disable keys, add credits, audit.

Behind the admin token of the settings (`Authorization: Bearer <token>` or `x-admin-token`),
compared in constant time. Without a configured token these routes answer 404, as if they did not
exist: an operator turns them on deliberately. Users' API keys never open them.

A key's name is the rest of the path before the action (`{name:path}`), so every name the CLI
accepts, `/` included, can be managed here too; percent-encode what a URL cannot carry as is.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from server.api.deps import ServingDep, validated_json
from server.api.renderers import SegmindRoute
from server.credits import format_credits
from server.key_admin import KeyAdmin
from server.ledger import KeyRecord

router = APIRouter(prefix="/admin", include_in_schema=True, tags=["admin"], route_class=SegmindRoute)


class NewKey(BaseModel):
    name: str = Field(min_length=1, max_length=128)
    credits: str = "0"


class Grant(BaseModel):
    amount: str


async def key_admin(request: Request, serving: ServingDep) -> KeyAdmin:
    """Key management, to a caller with the admin token (`x-admin-token` or a Bearer token)."""
    sent = request.headers.get("x-admin-token") or request.headers.get("authorization", "").removeprefix(
        "Bearer "
    )
    serving.admin.authorize(sent)
    return serving.admin


AdminDep = Annotated[KeyAdmin, Depends(key_admin)]


# The bodies are read after the token is checked: 404/401 win over 422. An empty body is `{}`.
async def new_key_body(request: Request, _admin: AdminDep) -> NewKey:
    return await validated_json(request, NewKey, when_empty=b"{}")


async def grant_body(request: Request, _admin: AdminDep) -> Grant:
    return await validated_json(request, Grant, when_empty=b"{}")


def _key_json(record: KeyRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "prefix": record.prefix,
        "enabled": record.enabled,
        "credits": format_credits(record.balance),
        "created_at": record.created_at.isoformat(),
    }


@router.post("/keys")
async def create_key(admin: AdminDep, body: Annotated[NewKey, Depends(new_key_body)]) -> dict[str, Any]:
    record, key = await admin.create_key(body.name, body.credits)
    return {**_key_json(record), "key": key}  # the only time the key is shown


@router.get("/keys")
async def list_keys(admin: AdminDep) -> dict[str, Any]:
    return {"keys": [_key_json(record) for record in await admin.list_keys()]}


@router.post("/keys/{name:path}/disable")
async def disable_key(admin: AdminDep, name: str) -> dict[str, Any]:
    await admin.set_enabled(name, False)
    return {"name": name, "enabled": False}


@router.post("/keys/{name:path}/enable")
async def enable_key(admin: AdminDep, name: str) -> dict[str, Any]:
    await admin.set_enabled(name, True)
    return {"name": name, "enabled": True}


@router.post("/keys/{name:path}/credits")
async def add_credits(
    admin: AdminDep, name: str, body: Annotated[Grant, Depends(grant_body)]
) -> dict[str, Any]:
    return {"name": name, "credits": format_credits(await admin.add_credits(name, body.amount))}


@router.get("/audit")
async def audit(admin: AdminDep) -> dict[str, Any]:
    rows = await admin.audit()
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
