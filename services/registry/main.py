"""The registry's composition root: settings, logging, tracing, metrics, storage, core, server."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog
from maas.registry.v1 import registry_pb2, registry_pb2_grpc

from services.registry.adapters.local_store import LocalArtifactStore
from services.registry.adapters.sql.repository import SqlRepository
from services.registry.adapters.sql.tables import MIGRATIONS
from services.registry.api.servicer import AUTHORIZATION, RegistryServicer
from services.registry.core.ports import ArtifactStore
from services.registry.core.service import RegistryCore
from services.registry.settings import RegistrySettings
from shared.artifacts.crypto import BlobCipher, LocalKms
from shared.grpc.server import ServiceServer, start_service
from shared.logging import configure_logging
from shared.sql import create_engine, migrate
from shared.tracing import configure_tracing

SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name
log = structlog.get_logger("maas.registry")


@dataclass
class RunningRegistry:
    server: ServiceServer
    core: RegistryCore

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def metrics_port(self) -> int:
        return self.server.metrics_port

    @property
    def internal_port(self) -> int:
        return self.server.internal_port


def _kms(settings: RegistrySettings) -> LocalKms | None:
    """The KEK: from the setting, else its file (made at the first start when encryption is on)."""
    if settings.registry_kek is not None:
        return LocalKms.from_text(settings.registry_kek.get_secret_value())
    path = settings.kek_file()
    if settings.registry_encryption or path.exists():
        # Kept even with encryption off, so blobs encrypted before stay readable.
        return LocalKms.from_file(path, create=True)
    return None


def _artifact_store(settings: RegistrySettings) -> ArtifactStore:
    kms = _kms(settings)
    cipher = BlobCipher(kms) if kms is not None else None
    # With encryption off, new blobs are written in the clear; the cipher still reads encrypted ones.
    write_cipher = cipher if settings.registry_encryption else None
    if settings.registry_artifact_url:
        from services.registry.adapters.s3_store import S3ArtifactStore

        return S3ArtifactStore(
            settings.registry_artifact_url,
            settings.artifact_dir() / "spool",
            settings.registry_s3_endpoint_url,
            cipher=cipher,
            encrypt=write_cipher is not None,
        )
    return LocalArtifactStore(settings.artifact_dir(), cipher=cipher, encrypt=write_cipher is not None)


async def start(settings: RegistrySettings) -> RunningRegistry:
    """Start the registry with ``settings``; also what tests call (with port 0 addresses)."""
    configure_tracing("registry", settings.otel_exporter, settings.otel_endpoint)
    database_url = settings.database_url()
    if database_url.startswith("sqlite:///"):
        (settings.home / "registry").mkdir(parents=True, exist_ok=True)
    engine = create_engine(database_url)
    await asyncio.to_thread(migrate, engine, MIGRATIONS)
    store = _artifact_store(settings)
    core = RegistryCore(
        SqlRepository(engine),
        store,
        max_artifact_bytes=settings.registry_max_artifact_bytes,
        download_chunk_bytes=settings.registry_download_chunk_bytes,
        watch_poll_s=settings.registry_watch_poll_s,
        max_watchers=settings.registry_max_watchers,
        protected_aliases=settings.registry_protected_aliases,
    )
    swept = await core.recover()
    if swept:
        log.warning("recovered_interrupted_uploads", removed=swept)
    servicer = RegistryServicer(core, upload_idle_timeout_s=settings.registry_upload_idle_timeout_s)
    server = await start_service(
        settings,
        settings.registry_address,
        settings.registry_metrics_address,
        [lambda s: registry_pb2_grpc.add_RegistryServiceServicer_to_server(servicer, s)],
        [SERVICE_NAME],
        authorization=AUTHORIZATION,
        internal_address=settings.registry_internal_address,
    )

    async def close() -> None:
        await asyncio.to_thread(engine.dispose)

    server.on_close.append(close)
    return RunningRegistry(server=server, core=core)


async def serve(settings: RegistrySettings) -> None:
    running = await start(settings)
    log.info("registry_ready", port=running.port, metrics_port=running.metrics_port)
    await running.server.wait_for_signal(settings.shutdown_grace_s)


def main() -> None:
    settings = RegistrySettings()
    configure_logging(
        "registry", settings.log_level, settings.log_format, settings.log_file, settings.log_file_max_bytes
    )
    asyncio.run(serve(settings))
