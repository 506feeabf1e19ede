"""API keys: what one looks like and how it is hashed.

The ledger stores only `hash_key(key)` and a short display prefix; the plaintext is shown once,
when the key is created.
"""

from __future__ import annotations

import hashlib
import secrets

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
