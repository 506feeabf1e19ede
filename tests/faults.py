"""A process killed at one of its writes, for the crash-recovery tests of the server and its replicas.

Patching the write to raise stops the code there as a kill would: what was written before stays,
nothing after it runs. (The in-process ledger stays open, which a real kill would not leave; the
tests only read what the database holds.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import pytest


class Killed(Exception):
    """The process dying at a patched write."""


@contextmanager
def killed_at(monkeypatch: pytest.MonkeyPatch, owner: type, method: str) -> Iterator[None]:
    """Run the block with `owner.method` killing the process; the block must reach it."""

    def die(*args: Any, **kwargs: Any) -> NoReturn:
        raise Killed(f"{owner.__name__}.{method}")

    with monkeypatch.context() as patched:
        patched.setattr(owner, method, die)
        with pytest.raises(Killed):
            yield
