"""API keys: what one looks like, how it is hashed, and `x-api-key` → key record.

The ledger stores only `hash_key(key)` and a short display prefix; the plaintext is shown once,
when the key is created.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import TYPE_CHECKING

from server.errors import MissingApiKey, Unauthorized

if TYPE_CHECKING:
    from server.ledger import KeyRecord, Ledger

KEY_SCHEME = "sd3_"
# 32 random bytes: 256 bits of entropy, 43 url-safe characters after the scheme.
KEY_BYTES = 32
# Scheme + 6 characters: enough to tell keys apart in a listing, far too little to guess the rest.
PREFIX_LENGTH = len(KEY_SCHEME) + 6


def generate_key() -> str:
    return KEY_SCHEME + secrets.token_urlsafe(KEY_BYTES)


def hash_key(key: str) -> str:
    # A fast hash is the standard choice here: the keys are 256-bit random strings, not passwords, so
    # there is nothing to brute-force and a slow KDF would only cost every request time.
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_prefix(key: str) -> str:
    return key[:PREFIX_LENGTH]


def authenticate(ledger: Ledger, api_key: str | None) -> KeyRecord:
    if api_key is None or not api_key.strip():
        raise MissingApiKey()
    # The ledger finds the row by its indexed hash and confirms it with hmac.compare_digest
    # (Ledger.find_by_hash), so the stored hashes never leave the ledger.
    record = ledger.find_by_hash(hash_key(api_key.strip()))
    if record is None or not record.enabled:
        raise Unauthorized()
    return record
