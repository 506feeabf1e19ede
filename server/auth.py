"""`x-api-key` → key record: a lookup in the ledger by the key's hash (server/keys.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.errors import MissingApiKey, Unauthorized
from server.keys import hash_key

if TYPE_CHECKING:
    from server.ledger import KeyRecord, Ledger


def authenticate(ledger: Ledger, api_key: str | None) -> KeyRecord:
    if api_key is None or not api_key.strip():
        raise MissingApiKey()
    # The ledger finds the row by its indexed hash and confirms it with hmac.compare_digest
    # (Ledger.find_by_hash), so the stored hashes never leave the ledger.
    record = ledger.find_by_hash(hash_key(api_key.strip()))
    if record is None or not record.enabled:
        raise Unauthorized()
    return record
