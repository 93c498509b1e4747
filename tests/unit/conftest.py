"""Unit tests are the pure tier: no sockets to other processes, no Ray. A test that would start Ray (or join
a cluster) fails at once instead of quietly turning into an integration test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import ray


def _refuse(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("a unit test tried to start Ray: that belongs in tests/integration")


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Per test, not per session: the integration tests later in the same run start Ray for real.
    monkeypatch.setattr(ray, "init", _refuse)
    yield
