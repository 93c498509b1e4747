"""Data-parallel training through real parameter-server shards (gRPC on loopback), workers in-process.

This pins the algorithms (consistency modes, codecs, server-side optimizers) through the shards' public
API; running the same workers as Ray actors placed by the scheduler is the scheduler's test.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from maas.paramserver.v1 import paramserver_pb2 as pb

from services.paramserver.main import start
from services.paramserver.settings import ParamServerSettings
from services.training.adapters.shards import GrpcShard
from services.training.core.loop import StepReport
from services.training.core.worker import WorkerSpec, run_worker
from shared.clients.paramserver import ParamServerClient
from shared.datasets import DatasetSpec, validate

pytestmark = pytest.mark.slow
WORKERS, SHARDS, BATCH, EPOCHS = 2, 2, 32, 40


async def train(
    tmp_path: Path, *, consistency: str = "bsp", staleness: int = 0, codec: str = "none", codec_options=None
) -> tuple[dict[str, float], list[StepReport]]:  # type: ignore[no-untyped-def]
    job_id = f"job-{uuid.uuid4().hex[:8]}"
    dataset = DatasetSpec(name="digits")
    info = validate(dataset, "cnn", {})
    per_epoch = (info.num_train // WORKERS) // BATCH
    settings = ParamServerSettings(
        home=tmp_path, paramserver_address="127.0.0.1:0", paramserver_metrics_address="127.0.0.1:0"
    )
    servers = [await start(settings) for _ in range(SHARDS)]
    clients = [ParamServerClient.connect(f"127.0.0.1:{s.port}", settings) for s in servers]
    try:
        for index, client in enumerate(clients):
            await client.init_shard(
                pb.ShardConfig(
                    job_id=job_id,
                    shard_index=index,
                    num_shards=SHARDS,
                    num_workers=WORKERS,
                    consistency=consistency,
                    staleness=staleness,
                    model=pb.ModelSpec(architecture="cnn", arguments_json="{}", seed=7),
                    optimizer=pb.OptimizerSpec(name="sgd", hyperparameters={"lr": 0.05, "momentum": 0.9}),
                    checkpoint_interval=0,
                )
            )
        reports: list[StepReport] = []
        specs = [
            WorkerSpec(
                job_id=job_id,
                rank=rank,
                world_size=WORKERS,
                architecture="cnn",
                arguments_json=json.dumps({}),
                dataset=dataset,
                batch_size=BATCH,
                steps_per_epoch=per_epoch,
                total_steps=per_epoch * EPOCHS,
                num_shards=SHARDS,
                codec=codec,
                codec_options=codec_options or {},
                seed=7,
            )
            for rank in range(WORKERS)
        ]
        shards = [GrpcShard(c) for c in clients]
        results = await asyncio.gather(*(run_worker(spec, shards, progress=reports.append) for spec in specs))
        assert all(r.steps == per_epoch * EPOCHS for r in results)
        return results[0].metrics, reports
    finally:
        for client in clients:
            await client.close()
        for server in servers:
            await server.stop(0.2)


def bytes_per_step(reports: list[StepReport]) -> float:
    return sum(r.bytes_sent for r in reports) / len(reports)


async def test_bsp_and_compressed_codecs_reach_the_accuracy_targets(tmp_path: Path) -> None:
    baseline, dense = await train(tmp_path / "bsp")
    assert baseline["accuracy"] >= 0.97, baseline
    topk, sparse = await train(tmp_path / "topk", codec="topk", codec_options={"ratio": 0.01})
    assert topk["accuracy"] >= baseline["accuracy"] - 0.005, (topk, baseline)
    assert bytes_per_step(dense) >= 50 * bytes_per_step(sparse)
    int8, quantized = await train(tmp_path / "int8", codec="int8")
    assert int8["accuracy"] >= baseline["accuracy"] - 0.003, (int8, baseline)
    assert bytes_per_step(dense) >= 3.5 * bytes_per_step(quantized)


@pytest.mark.parametrize(("mode", "staleness"), [("asp", 0), ("ssp", 2)])
async def test_asynchronous_modes_converge(tmp_path: Path, mode: str, staleness: int) -> None:
    metrics, reports = await train(tmp_path, consistency=mode, staleness=staleness)
    assert metrics["accuracy"] >= 0.95, metrics
    first = [r.loss for r in reports[:10]]
    last = [r.loss for r in reports[-10:]]
    assert sum(last) < 0.2 * sum(first)
