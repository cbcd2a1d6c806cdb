"""Shared fixtures: every async test runs on both anyio backends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from flowing import clear_registry

# Property tests: a quick "ci" profile by default; a long soak with
# `pytest tests/test_properties.py --hypothesis-profile=soak`.
settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "soak", max_examples=5_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def _fresh_registry() -> Iterator[None]:
    """Detached tasks declared by one test must not join another test's flows."""
    clear_registry()
    yield
    clear_registry()
