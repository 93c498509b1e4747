"""The serving path in one process, for per-request CPU and profiles: ``python -m benchmarks.serving_profile``.

A registry, an inference worker (``services.inference.main.hosted``, the MLP of ``benchmarks.serving``), a
gateway that knows the worker from a fixed snapshot (no scheduler, no Ray) and the client, all on one event
loop. No wall-clock figure from here compares with the mesh's (the servers share one core and skip the
process hops), but the CPU each request costs this process does, and it moves with the code on the path, not
with the other work on a shared machine as much as throughput does: alternate two trees to compare them.
``--profile`` prints cProfile's busiest functions of the path (``--filter``: a regular expression on their
file names) over one more block through the gateway.

    python -m benchmarks.serving_profile --concurrency 1 --requests 1000 --rounds 3
    python -m benchmarks.serving_profile --profile --filter 'services/|shared/|opentelemetry'
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import torch

from benchmarks.serving import BATCHING, build_artifacts, infer_request, mlp_input

Call = Callable[[], Awaitable[object]]


class _Snapshot:
    """The gateway's ``EndpointSource``: one fixed snapshot."""

    def __init__(self, deployments: Sequence[Any]) -> None:
        self._deployments = list(deployments)

    async def follow(self, apply: Callable[[Sequence[Any]], None], lost: Callable[[], None]) -> None:
        apply(self._deployments)
        await asyncio.Event().wait()


class _NoLoad:
    async def report(self, ongoing: Mapping[str, float]) -> None:
        return None


class _NoControl:
    async def get(self, name: str) -> None:
        return None

    async def list_deployments(self) -> list[Any]:
        return []

    async def apply(self, options: Any) -> Any:
        raise RuntimeError("no deployment control here")

    async def delete(self, name: str) -> None:
        raise RuntimeError("no deployment control here")

    async def registry_models(self) -> list[str]:
        return []


async def _block(call: Call, requests: int, concurrency: int) -> tuple[float, float, float]:
    """p50 ms, requests/s, and this process's CPU µs per request over ``requests`` calls."""
    latencies: list[float] = []

    async def drive(count: int) -> None:
        for _ in range(count):
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(drive(requests // concurrency) for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    latencies.sort()
    return latencies[len(latencies) // 2] * 1e3, len(latencies) / wall, cpu / len(latencies) * 1e6


async def run(concurrency: int, requests: int, rounds: int, profile: bool, pattern: str) -> None:
    from inference import grpc_service_pb2_grpc
    from maas.inference.v1 import worker_pb2 as wpb
    from maas.inference.v1 import worker_pb2_grpc

    from services.gateway.core.model import Deployment, Endpoint, ServedVersion
    from services.gateway.main import start as start_gateway
    from services.gateway.settings import GatewaySettings
    from services.inference.main import hosted
    from services.registry.main import start as start_registry
    from services.registry.settings import RegistrySettings
    from shared.artifacts import read_manifest
    from shared.clients.registry import RegistryClient
    from shared.kserve.batching import BatchingSettings

    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="maas-serving-profile-"))
    path, manifest_json, _ = build_artifacts(workdir)["mlp"]
    registry_settings = RegistrySettings(
        home=workdir / "registry",
        registry_address="127.0.0.1:0",
        registry_metrics_address="127.0.0.1:0",
        registry_database_url=f"sqlite:///{workdir / 'registry.db'}",
        insecure=True,
    )
    registry = await start_registry(registry_settings)
    client = RegistryClient.connect(f"127.0.0.1:{registry.port}", registry_settings)
    await client.upload_file("mlp", path, manifest_json)
    worker = await hosted(
        {
            "home": workdir / "worker",
            "inference_registry_address": f"127.0.0.1:{registry.port}",
            "inference_device": "cpu",
            "insecure": True,
        }
    )
    channels: list[grpc.aio.Channel] = []
    gateway = None
    try:
        worker_channel = grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}")
        channels.append(worker_channel)
        batching = wpb.BatchingConfig(**BATCHING)
        load = wpb.LoadModelRequest(ref=wpb.ModelRef(model="mlp", version=1), batching=batching)
        await worker_pb2_grpc.InferenceWorkerStub(worker_channel).LoadModel(load, timeout=60)
        served = ServedVersion(
            version=1,
            signature=read_manifest(path).signature,
            max_batch_size=BATCHING["max_batch_size"],
            batching=BatchingSettings(**BATCHING),
        )
        endpoint = Endpoint(f"127.0.0.1:{worker.port}", 1, "mlp-0")
        deployment = Deployment(name="mlp", versions={1: served}, endpoints=(endpoint,), default_version=1)
        gateway = await start_gateway(
            GatewaySettings(
                home=workdir / "gateway",
                gateway_address="127.0.0.1:0",
                gateway_metrics_address="127.0.0.1:0",
                insecure=True,
            ),
            endpoints=_Snapshot([deployment]),
            load_sink=_NoLoad(),
            control=_NoControl(),
        )
        gateway_channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
        channels.append(gateway_channel)
        request = infer_request("mlp", "input", mlp_input(1))
        to_worker = grpc_service_pb2_grpc.GRPCInferenceServiceStub(worker_channel)
        to_gateway = grpc_service_pb2_grpc.GRPCInferenceServiceStub(gateway_channel)
        pinned = (("maas-model-version", "1"),)
        calls: dict[str, Call] = {
            "worker": lambda: to_worker.ModelInfer(request, metadata=pinned),
            "gateway": lambda: to_gateway.ModelInfer(request),
        }
        for call in calls.values():
            await _block(call, 300, concurrency)  # warm-up
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                results[name].append(await _block(call, requests, concurrency))
        print(f"c={concurrency}, {rounds} rounds of {requests} requests per path (one process)")
        for name, rows in results.items():
            cells = "  ".join(f"p50 {p50:.3f} ms {rps:5.0f} req/s CPU {cpu:5.0f} us/req" for p50, rps, cpu in rows)
            print(f"  {name:8s} {cells}")
        if profile:
            profiler = cProfile.Profile()
            profiler.enable()
            await _block(calls["gateway"], requests, concurrency)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(pattern, 40)
    finally:
        for channel in channels:
            await channel.close()
        if gateway is not None:
            await gateway.stop(0.1)
        await worker.stop(0.1)
        await client.close()
        await registry.server.stop(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--requests", type=int, default=1000, help="requests per path per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="cProfile one more block through the gateway")
    parser.add_argument("--filter", default="services/|shared/", help="functions shown by --profile (file regex)")
    args = parser.parse_args()
    asyncio.run(run(args.concurrency, args.requests, args.rounds, args.profile, args.filter))


if __name__ == "__main__":
    main()
