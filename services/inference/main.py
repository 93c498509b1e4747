"""The inference worker's composition root: settings, logging, tracing, registry client, core, servers.

``python -m services.inference`` runs one worker; the scheduler runs :func:`hosted` inside a Ray actor
(``services.inference.main:hosted``) and routes the gateway to the address it returns.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog
import torch
from inference import grpc_service_pb2, grpc_service_pb2_grpc
from maas.inference.v1 import worker_pb2, worker_pb2_grpc

from services.inference.adapters.prometheus import PrometheusObserver
from services.inference.adapters.registry_source import RegistryArtifactSource
from services.inference.api.servicer import AUTHORIZATION, InferenceServicer, WorkerServicer
from services.inference.core.host import ModelHost
from services.inference.core.runner import resolve_device
from services.inference.settings import InferenceSettings
from shared.artifacts import configure_zoo_limits
from shared.clients.registry import RegistryClient
from shared.grpc.server import ServiceServer, start_service
from shared.kserve.batching import BatchingSettings
from shared.logging import configure_logging
from shared.metrics import RpcMetrics
from shared.tracing import configure_tracing

KSERVE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["InferenceWorker"].full_name
log = structlog.get_logger("maas.inference")


@dataclass
class RunningWorker:
    """A started worker: its server, core and compute thread."""

    server: ServiceServer
    host: ModelHost
    grace_s: float = 10.0

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def metrics_port(self) -> int:
        return self.server.metrics_port

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, drain in-flight RPCs for ``grace`` seconds (default: the settings'), then close."""
        await self.server.stop(self.grace_s if grace is None else grace)


def _compute_executor(threads: int) -> ThreadPoolExecutor:
    # One compute thread: executions never compete with each other for the cores, and the event loop
    # (health, new requests, batching) stays free. Its torch thread count is set where it runs.
    return ThreadPoolExecutor(
        1, thread_name_prefix="inference-compute", initializer=torch.set_num_threads, initargs=(threads,)
    )


async def start(settings: InferenceSettings) -> RunningWorker:
    """Start one worker with ``settings``; also what tests and the scheduler's actors call."""
    configure_tracing("inference", settings.otel_exporter, settings.otel_endpoint)
    configure_zoo_limits(settings.zoo_max_elements)
    torch.set_num_threads(settings.inference_torch_threads)
    device = resolve_device(settings.inference_device)
    client = RegistryClient.connect(settings.inference_registry_address, settings)
    source = RegistryArtifactSource(client, settings.cache_dir())
    executor = _compute_executor(settings.inference_torch_threads)
    # The worker's own metrics share the registry its Prometheus endpoint serves with the RPC metrics.
    metrics = RpcMetrics.create()
    host = ModelHost(
        source,
        executor,
        device,
        settings.inference_memory_budget_bytes,
        warmup=settings.inference_warmup,
        max_new_tokens=settings.inference_max_new_tokens,
        max_queue_bytes=settings.inference_max_queue_bytes,
        observer=PrometheusObserver(metrics.registry),
    )
    inference = InferenceServicer(host)
    worker = WorkerServicer(host, settings.max_message_bytes // 2)
    try:
        server = await start_service(
            settings,
            settings.inference_address,
            settings.inference_metrics_address,
            [
                lambda s: grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(inference, s),
                lambda s: worker_pb2_grpc.add_InferenceWorkerServicer_to_server(worker, s),
            ],
            [KSERVE_SERVICE, WORKER_SERVICE],
            metrics=metrics,
            authorization=AUTHORIZATION,
        )
    except BaseException:
        await source.close()
        executor.shutdown(wait=False)
        raise

    async def close() -> None:
        await host.close()
        await source.close()
        await asyncio.to_thread(executor.shutdown)

    server.on_stopping.append(worker.begin_drain)
    server.on_close.append(close)
    return RunningWorker(server=server, host=host, grace_s=settings.shutdown_grace_s)


async def hosted(options: dict[str, Any]) -> RunningWorker:
    """The entry point a scheduler's service-host actor calls (``services.inference.main:hosted``).

    ``options`` holds ``InferenceSettings`` fields (the rest come from ``MAAS_*`` variables), ``bind_host``
    (``"node"`` listens on every interface) and ``models``: ``[{"model", "version", "batching": {...}}]``,
    loaded and warmed up before this returns, so the replica is ready when its address is reported.
    """
    fields = {name: value for name, value in options.items() if name in InferenceSettings.model_fields}
    if options.get("bind_host") == "node" and "inference_address" not in fields:
        fields["inference_address"] = "0.0.0.0:0"
    settings = InferenceSettings(**fields)
    running = await start(settings)
    try:
        for spec in options.get("models", ()):
            batching = BatchingSettings.resolve(**dict(spec.get("batching") or {}))
            await running.host.load(
                str(spec["model"]),
                int(spec["version"]),
                batching,
                require_signature=bool(spec.get("require_signature", False)),
            )
    except BaseException:
        await running.stop(0)
        raise
    return running


async def serve(settings: InferenceSettings) -> None:
    running = await start(settings)
    log.info("inference_worker_ready", port=running.port, metrics_port=running.metrics_port)
    await running.server.wait_for_signal(settings.shutdown_grace_s)


def main() -> None:
    settings = InferenceSettings()
    configure_logging(
        "inference", settings.log_level, settings.log_format, settings.log_file, settings.log_file_max_bytes
    )
    asyncio.run(serve(settings))
