"""Shared fixtures: every async test runs on both anyio backends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from flowing import clear_registry


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def _fresh_registry() -> Iterator[None]:
    """Detached tasks declared by one test must not join another test's flows."""
    clear_registry()
    yield
    clear_registry()
