"""Fixtures of the integration tier: one local Ray for the whole session, shared by every module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    # Once per session (DEVELOPERS.md): more logical CPUs than the 2 cores, so a gang fits.
    ray.init(num_cpus=8, include_dashboard=False, namespace="maas", log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
