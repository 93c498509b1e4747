"""The inference worker's Prometheus metrics, scraped from a real worker's endpoint after real traffic.

The counts are checked against what the worker reports through ``ModelStatistics``: both views record the
same events.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from inference import grpc_service_pb2 as kpb
from maas.inference.v1 import worker_pb2 as wpb
from prometheus_client.parser import text_string_to_metric_families

from services.inference.main import RunningWorker, hosted
from tests.contract.test_inference_worker import MLP, SLOW_MLP, control, kserve, load, push, raw_request

FAMILIES = {
    "maas_inference_queue_seconds": "histogram",
    "maas_inference_batch_size": "histogram",
    "maas_inference_compute_seconds": "histogram",
    "maas_inference_requests": "counter",
    "maas_inference_queue_depth": "gauge",
    "maas_inference_loaded_bytes": "gauge",
    "maas_rpc_requests": "counter",  # the RPC metrics share the endpoint
}


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'registry.db'}"


@pytest.fixture
async def worker(registry: Any, tmp_path: Path) -> AsyncIterator[RunningWorker]:
    running = await hosted(
        {
            "home": tmp_path / "home",
            "inference_registry_address": f"127.0.0.1:{registry.port}",
            "inference_device": "cpu",
            "inference_memory_budget_bytes": 64 * 1024 * 1024,
            "inference_metrics_address": "127.0.0.1:0",
            "shutdown_grace_s": 1.0,
        }
    )
    yield running
    await running.stop(0.5)


class Scrape:
    """One scrape of the endpoint: families by name and sample values by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.types = {}
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))


async def scrape(worker: RunningWorker) -> Scrape:
    url = f"http://127.0.0.1:{worker.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    return Scrape(text)


async def test_worker_metrics_match_its_statistics(registry_client: Any, worker: RunningWorker, tmp_path: Path) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
        stub = kserve(channel)
        await push(registry_client, tmp_path, "mlp", "mlp", MLP)
        loaded = await load(channel, "mlp", max_batch_size=8, max_queue_delay_us=20_000)
        before = await scrape(worker)
        mlp = {"model": "mlp", "version": "1"}
        assert before.value("maas_inference_loaded_bytes", **mlp) == loaded.memory_bytes
        assert before.value("maas_inference_queue_depth", **mlp) == 0
        assert before.value("maas_inference_requests_total", outcome="success", **mlp) == 0

        # Concurrent requests: batched by the dynamic batcher.
        sent = 12
        xs = [np.full((1, 16), i / 16, np.float32) for i in range(sent)]
        await asyncio.gather(*(stub.ModelInfer(raw_request("mlp", x), timeout=10) for x in xs))
        stats = (await stub.ModelStatistics(kpb.ModelStatisticsRequest(name="mlp"))).model_stats[0]
        assert stats.inference_stats.success.count == sent

        # A queue of one in front of a slow model: most of a burst is rejected.
        await push(registry_client, tmp_path, "slow", "mlp", SLOW_MLP)
        await load(channel, "slow", max_batch_size=1, max_queue_size=1)
        x = np.zeros((1, 256), np.float32)
        results = await asyncio.gather(
            *(stub.ModelInfer(raw_request("slow", x), timeout=30) for _ in range(12)), return_exceptions=True
        )
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert refused and all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)

        after = await scrape(worker)
        for name, kind in FAMILIES.items():
            assert after.types.get(name) == kind, name
        assert after.value("maas_inference_batch_size_count", **mlp) == stats.execution_count
        assert after.value("maas_inference_batch_size_sum", **mlp) == stats.inference_count == sent
        assert after.value("maas_inference_compute_seconds_count", **mlp) == stats.execution_count
        assert after.value("maas_inference_queue_seconds_count", **mlp) == sent
        compute_s = after.value("maas_inference_compute_seconds_sum", **mlp)
        assert compute_s is not None and 0 < compute_s < 10
        assert after.value("maas_inference_requests_total", outcome="success", **mlp) == sent
        assert after.value("maas_inference_requests_total", outcome="fail", **mlp) == 0
        assert after.value("maas_inference_requests_total", outcome="rejected", **mlp) == 0
        assert after.value("maas_inference_queue_depth", **mlp) == 0

        slow = {"model": "slow", "version": "1"}
        succeeded = len(results) - len(refused)
        assert after.value("maas_inference_requests_total", outcome="success", **slow) == succeeded
        assert after.value("maas_inference_requests_total", outcome="rejected", **slow) == len(refused)
        assert after.value("maas_inference_batch_size_bucket", le="1.0", **slow) == succeeded

        # Unloading drops the version's gauges; its counters stay.
        await control(channel).UnloadModel(wpb.UnloadModelRequest(ref=wpb.ModelRef(model="slow", version=1)))
        unloaded = await scrape(worker)
        assert unloaded.value("maas_inference_loaded_bytes", **slow) is None
        assert unloaded.value("maas_inference_queue_depth", **slow) is None
        assert unloaded.value("maas_inference_loaded_bytes", **mlp) == loaded.memory_bytes
        assert unloaded.value("maas_inference_requests_total", outcome="rejected", **slow) == len(refused)
