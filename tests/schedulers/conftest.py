from __future__ import annotations

import pytest
from reference import Toy


@pytest.fixture(scope="session")
def toy() -> Toy:
    return Toy()
