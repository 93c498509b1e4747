"""Fixtures shared by every test tier."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from shared.logging import configure_logging
from tests.support.postgres import PostgresServer, postgres_server

# Servers in this suite run in development mode (plaintext, no authentication) unless a test turns security
# on: tests/contract/test_security.py covers TLS, keys, roles and the authorization tables, and the
# `maas up` integration test runs the secure default end to end.
os.environ.setdefault("MAAS_INSECURE", "1")


def pytest_configure(config: pytest.Config) -> None:
    configure_logging("tests", "warning", "json")
    # The services under test share this process's tracer provider (the first one installed wins):
    # record spans, so tests can attach an in-memory exporter and follow a trace.
    from shared.tracing import configure_tracing

    configure_tracing("tests", record=True)
    # Model code in tests shares two cores with servers and clients: one torch thread (MEASUREMENTS.md).
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def registry_settings(tmp_path: Path, database_url: str):
    from services.registry.settings import RegistrySettings

    return RegistrySettings(
        home=tmp_path / "home",
        registry_address="127.0.0.1:0",
        registry_metrics_address="127.0.0.1:0",
        registry_database_url=database_url,
        registry_max_artifact_bytes=64 * 1024 * 1024,
        registry_watch_poll_s=0.5,
        shutdown_grace_s=1.0,
    )


@pytest.fixture
async def registry(registry_settings) -> AsyncIterator[object]:
    """A real registry server on port 0 with the full interceptor chain."""
    from services.registry.main import start

    running = await start(registry_settings)
    yield running
    await running.server.stop(0.5)


@pytest.fixture
async def registry_client(registry, registry_settings) -> AsyncIterator[object]:
    from shared.clients.registry import RegistryClient

    client = RegistryClient.connect(f"127.0.0.1:{registry.port}", registry_settings)
    yield client
    await client.close()


os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
