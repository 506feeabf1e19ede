"""Operators' key management (the `/admin` routes): who may use it, and one ledger call per action.

The routes only translate HTTP; this decides: the admin token is checked here (in constant time),
each ledger call runs in a worker thread so the event loop never waits on the database, and the
ledger's domain errors become the API's (404 for an unknown key, 422 for a bad amount or name).
"""

from __future__ import annotations

import hmac
from decimal import Decimal

from anyio import to_thread
from pydantic import SecretStr

from server.credits import InvalidAmount, parse_credits
from server.errors import (
    BalanceLimitExceeded,
    InvalidRequest,
    KeyNameTaken,
    NotFound,
    Unauthorized,
    UnknownKey,
)
from server.ledger import AuditRow, KeyRecord, Ledger


def _amount(field: str, text: str) -> Decimal:
    try:
        return parse_credits(text)
    except InvalidAmount as exc:
        raise InvalidRequest(f"{field}: {exc}") from None


class KeyAdmin:
    def __init__(self, ledger: Ledger, token: SecretStr | None) -> None:
        self._ledger = ledger
        self._token = token

    def authorize(self, sent: str | None) -> None:
        """Let the caller in with the configured token. Without one configured the routes do not exist
        (404): an operator turns them on deliberately, and users' API keys never open them."""
        if self._token is None:
            raise NotFound()
        if not sent or not hmac.compare_digest(sent.encode(), self._token.get_secret_value().encode()):
            raise Unauthorized("Unauthorized: this needs the admin token")

    async def create_key(self, name: str, credits: str) -> tuple[KeyRecord, str]:
        """A new key and its plaintext (shown this once)."""
        amount = _amount("credits", credits)
        try:
            return await to_thread.run_sync(lambda: self._ledger.create_key(name=name, credits=amount))
        except KeyNameTaken:
            raise InvalidRequest(f"name: a key named {name!r} already exists") from None
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None

    async def list_keys(self) -> list[KeyRecord]:
        return await to_thread.run_sync(self._ledger.list_keys)

    async def set_enabled(self, name: str, enabled: bool) -> None:
        try:
            await to_thread.run_sync(lambda: self._ledger.set_enabled(name, enabled))
        except UnknownKey:
            raise NotFound(f"No key named {name!r}") from None

    async def add_credits(self, name: str, amount: str) -> Decimal:
        """Grant `amount` to the key; its new balance."""
        value = _amount("amount", amount)
        try:
            return await to_thread.run_sync(lambda: self._ledger.add_credits(name, value, note="admin api"))
        except UnknownKey:
            raise NotFound(f"No key named {name!r}") from None
        except (BalanceLimitExceeded, ValueError) as exc:
            raise InvalidRequest(f"amount: {exc}") from None

    async def audit(self) -> list[AuditRow]:
        return await to_thread.run_sync(self._ledger.audit)
