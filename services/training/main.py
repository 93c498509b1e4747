"""The training worker's composition root: settings, shard clients, registry sink, session, server.

``hosted(options)`` is the entry point the scheduler's Ray actors call; ``options`` carries the worker's
part of the job (see :func:`spec_from_options`) and settings overrides.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import torch
from maas.registry.v1 import registry_pb2
from maas.training.v1 import training_pb2, training_pb2_grpc
from opentelemetry import trace

from services.training.adapters.registry_sink import RegistrySink
from services.training.adapters.shards import GrpcShard
from services.training.api.servicer import AUTHORIZATION, TrainingWorkerServicer
from services.training.core.session import WorkerSession
from services.training.core.worker import WorkerSpec
from services.training.settings import TrainingSettings
from shared.artifacts import configure_zoo_limits
from shared.clients.paramserver import ParamServerClient
from shared.clients.registry import RegistryClient
from shared.datasets import DatasetSpec
from shared.grpc.server import ServiceServer, start_service
from shared.logging import configure_logging
from shared.tracing import configure_tracing, continue_trace

SERVICE_NAME = training_pb2.DESCRIPTOR.services_by_name["TrainingWorker"].full_name


@dataclass
class RunningWorker:
    server: ServiceServer
    session: WorkerSession
    clients: list[Any]

    @property
    def port(self) -> int:
        return self.server.port

    async def stop(self, grace: float | None = None) -> None:
        await self.session.stop()
        await self.server.stop(1.0 if grace is None else grace)
        for client in self.clients:
            await client.close()


def spec_from_options(options: dict[str, Any]) -> WorkerSpec:
    dataset = options["dataset"]
    return WorkerSpec(
        job_id=options["job_id"],
        rank=int(options["rank"]),
        world_size=int(options["world_size"]),
        architecture=options["architecture"],
        arguments_json=options["arguments_json"],
        dataset=DatasetSpec(
            name=dataset["name"],
            options=dict(dataset.get("options", {})),
            validation_fraction=float(dataset.get("validation_fraction") or 0.2),
            seed=int(dataset.get("seed", 0)),
        ),
        batch_size=int(options["batch_size"]),
        steps_per_epoch=int(options["steps_per_epoch"]),
        total_steps=int(options["total_steps"]),
        num_shards=len(options["shard_addresses"]),
        codec=options.get("codec") or "none",
        codec_options=dict(options.get("codec_options", {})),
        seed=int(options.get("seed", 0)),
        max_piece_elements=int(options.get("max_piece_elements", 0)),
        data_root=options.get("data_root"),
        dataset_fingerprint=options.get("dataset_fingerprint"),
    )


async def hosted(options: dict[str, Any]) -> RunningWorker:
    """Start one rank: its gRPC server (port 0) and its training session."""
    fields = dict(options.get("settings", {}))
    if options.get("bind_host") == "node" and "training_address" not in fields:
        # Listen on every interface: the scheduler follows this rank from another host on a cluster.
        fields["training_address"] = "0.0.0.0:0"
    settings = TrainingSettings(**fields)
    configure_logging(
        "training", settings.log_level, settings.log_format, settings.log_file, settings.log_file_max_bytes
    )
    configure_tracing("training", settings.otel_exporter, settings.otel_endpoint)
    configure_zoo_limits(settings.zoo_max_elements)
    torch.set_num_threads(settings.training_torch_threads)
    spec = spec_from_options(options)
    shard_clients = [ParamServerClient.connect(address, settings) for address in options["shard_addresses"]]
    registry = RegistryClient.connect(options["registry_address"], settings)
    lineage = registry_pb2.Lineage()
    lineage.ParseFromString(bytes.fromhex(options.get("lineage_hex", "")))
    sink = RegistrySink(
        registry, options["target_model"], lineage, dict(options.get("tags", {})), tenant=options.get("tenant")
    )
    session = WorkerSession(spec, [GrpcShard(c) for c in shard_clients], sink, resume=bool(options.get("resume")))
    servicer = TrainingWorkerServicer(session)
    server = await start_service(
        settings,
        settings.training_address,
        settings.training_metrics_address,
        [lambda s: training_pb2_grpc.add_TrainingWorkerServicer_to_server(servicer, s)],
        [SERVICE_NAME],
        authorization=AUTHORIZATION,
    )
    # The rank's calls (to its shards, to the registry) belong to the job's trace, under one span per rank
    # that lasts as long as the rank's work.
    span = continue_trace(
        "training rank", str(options.get("traceparent", "")), {"maas.job_id": spec.job_id, "maas.rank": spec.rank}
    )
    with trace.use_span(span, end_on_exit=False):
        task = session.start()
    task.add_done_callback(lambda _task: span.end())
    await asyncio.sleep(0)
    return RunningWorker(server=server, session=session, clients=[*shard_clients, registry])
