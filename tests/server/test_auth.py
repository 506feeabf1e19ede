import hashlib
import re
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from server.auth import authenticate
from server.errors import MissingApiKey, Unauthorized
from server.keys import generate_key, hash_key, key_prefix
from server.ledger import Ledger
from tests.databases import migrated


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger(migrated(f"sqlite:///{tmp_path / 'ledger.sqlite3'}"))
    yield ledger
    ledger.close()


def test_generated_keys_have_the_scheme_and_256_bits_of_randomness() -> None:
    keys = {generate_key() for _ in range(100)}
    assert len(keys) == 100
    for key in keys:
        assert re.fullmatch(r"sd3_[A-Za-z0-9_-]{43}", key)


def test_hash_is_the_sha256_hex_of_the_key() -> None:
    assert hash_key("sd3_abc") == hashlib.sha256(b"sd3_abc").hexdigest()


def test_prefix_shows_the_scheme_and_a_few_characters_only() -> None:
    key = generate_key()
    assert key_prefix(key) == key[:10]


def test_a_valid_key_authenticates_to_its_record(ledger: Ledger) -> None:
    record, key = ledger.create_key(name="alice", credits=Decimal("1.5"))
    assert authenticate(ledger, key) == record


@pytest.mark.parametrize("header", [None, "", "   "])
def test_a_missing_key_is_refused_with_the_missing_key_message(ledger: Ledger, header: str | None) -> None:
    with pytest.raises(MissingApiKey) as raised:
        authenticate(ledger, header)
    assert raised.value.status_code == 401
    assert raised.value.message == "Missing Authorization or x-api-key in header"


def test_an_unknown_key_is_unauthorized(ledger: Ledger) -> None:
    ledger.create_key(name="alice", credits=Decimal(1))
    with pytest.raises(Unauthorized) as raised:
        authenticate(ledger, generate_key())
    assert type(raised.value) is Unauthorized
    assert raised.value.message == "Unauthorized. API key is invalid or may have expired"


def test_the_hash_of_a_key_is_not_a_key(ledger: Ledger) -> None:
    _, key = ledger.create_key(name="alice", credits=Decimal(1))
    with pytest.raises(Unauthorized):
        authenticate(ledger, hash_key(key))


def test_a_disabled_key_is_unauthorized_until_enabled_again(ledger: Ledger) -> None:
    _, key = ledger.create_key(name="alice", credits=Decimal(1))
    ledger.set_enabled("alice", False)
    with pytest.raises(Unauthorized):
        authenticate(ledger, key)
    ledger.set_enabled("alice", True)
    assert authenticate(ledger, key).name == "alice"
