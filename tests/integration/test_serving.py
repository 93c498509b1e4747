"""Serving end to end on a real local Ray: registry -> scheduler deployment -> inference-worker actors ->
gateway, and the faults the gateway must hide: a replica killed under load, a rolling update under load, a
first request to a deployment scaled to zero. Every request goes through the public KServe v2 API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest
import ray
from inference import grpc_service_pb2 as kpb
from maas.scheduler.v1 import scheduler_pb2 as spb

from tests.support.serving import (
    MLP_ARGS,
    Load,
    ServingMesh,
    infer_request,
    output_array,
    ready,
    reference_forward,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Replicas ask for half a logical CPU so that several deployments and a rolling update's surge fit.
RESOURCES = {"cpus": 0.5}


@pytest.fixture(scope="module")
async def mesh(ray_local, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ServingMesh]:  # type: ignore[no-untyped-def]
    mesh = ServingMesh(tmp_path_factory.mktemp("serving"))
    await mesh.start(
        scheduler_replica_health_interval_s=0.5, scheduler_replica_drain_delay_s=0.5, scheduler_replica_stop_grace_s=2.0
    )
    yield mesh
    await mesh.stop()


async def test_concurrent_requests_are_batched_and_equal_unbatched_results(mesh: ServingMesh) -> None:
    _, path = await mesh.push("batched", "mlp", MLP_ARGS, seed=1)
    await mesh.deploy(
        model="batched",
        min_replicas=1,
        resources=RESOURCES,
        batching={"max_batch_size": 32, "max_queue_delay_us": 5000},
    )
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((1, 64)).astype(np.float32) for _ in range(48)]
    replies = await asyncio.gather(*(mesh.gateway.ModelInfer(infer_request("batched", x), timeout=60) for x in inputs))
    for x, reply in zip(inputs, replies, strict=True):
        np.testing.assert_allclose(output_array(reply), reference_forward(path, x), rtol=1e-4, atol=1e-5)
    stats = (await mesh.gateway.ModelStatistics(kpb.ModelStatisticsRequest(name="batched"))).model_stats
    assert len(stats) == 1
    # Every sample counted once, in fewer executions than requests: batches larger than one were formed.
    assert stats[0].inference_count >= 48
    assert stats[0].execution_count < stats[0].inference_count
    assert any(b.batch_size > 1 for b in stats[0].batch_stats)


async def test_a_killed_replica_fails_no_request_and_is_replaced(mesh: ServingMesh) -> None:
    await mesh.push("ha", "mlp", MLP_ARGS, seed=2)
    deployment = await mesh.deploy(
        model="ha", min_replicas=2, max_replicas=2, resources=RESOURCES, batching={"max_batch_size": 8}
    )
    deployment = await mesh.wait_deployment(
        "ha", lambda d: ready(d) and sum(r.state == spb.REPLICA_READY for r in d.replicas) == 2
    )
    x = np.ones((1, 64), dtype=np.float32)
    load = Load(lambda _: mesh.gateway.ModelInfer(infer_request("ha", x), timeout=60), concurrency=8)
    load.start()
    await asyncio.sleep(1.5)
    victim = deployment.replicas[0].id
    ray.kill(ray.get_actor(victim, namespace="maas"), no_restart=True)
    await asyncio.sleep(4.0)
    await load.stop()
    assert load.failures == [], load.failures[:5]
    assert load.succeeded > 20
    replaced = await mesh.wait_deployment(
        "ha",
        lambda d: (
            sum(r.state == spb.REPLICA_READY for r in d.replicas) == 2 and victim not in {r.id for r in d.replicas}
        ),
    )
    assert replaced.state == spb.DEPLOYMENT_READY


async def test_a_rolling_update_under_load_fails_no_request(mesh: ServingMesh) -> None:
    await mesh.push("rolling", "mlp", MLP_ARGS, seed=3)
    version_2, path_2 = await mesh.push("rolling", "mlp", MLP_ARGS, seed=4)
    await mesh.deploy(model="rolling", version="1", min_replicas=1, resources=RESOURCES)
    x = np.full((1, 64), 0.5, dtype=np.float32)
    load = Load(lambda _: mesh.gateway.ModelInfer(infer_request("rolling", x), timeout=60), concurrency=6)
    load.start()
    await asyncio.sleep(1.0)
    spec = spb.DeploymentSpec(model="rolling", version=str(version_2), min_replicas=1, resources=RESOURCES)
    await mesh.scheduler.UpdateDeployment(spb.UpdateDeploymentRequest(spec=spec))
    await mesh.wait_deployment(
        "rolling",
        lambda d: d.version == version_2 and ready(d) and all(r.version == version_2 for r in d.replicas),
    )
    await asyncio.sleep(1.0)
    await load.stop()
    assert load.failures == [], load.failures[:5]
    versions = [reply.model_version for reply in load.results]
    assert versions[0] == "1" and versions[-1] == str(version_2)
    np.testing.assert_allclose(output_array(load.results[-1]), reference_forward(path_2, x), rtol=1e-4, atol=1e-5)


async def test_the_first_request_to_a_deployment_scaled_to_zero_is_held_until_a_replica_serves_it(
    mesh: ServingMesh,
) -> None:
    _, path = await mesh.push("sleepy", "mlp", MLP_ARGS, seed=5)
    await mesh.deploy(
        wait_ready=False,
        model="sleepy",
        min_replicas=0,
        max_replicas=1,
        resources=RESOURCES,
        autoscaling={"target_ongoing_requests": 2, "upscale_delay_s": 0.5, "downscale_delay_s": 2},
    )
    idle = await mesh.wait_deployment("sleepy", lambda d: d.state == spb.DEPLOYMENT_READY)
    assert idle.target_replicas == 0 and not idle.replicas
    x = np.zeros((1, 64), dtype=np.float32)
    reply = await mesh.gateway.ModelInfer(infer_request("sleepy", x), timeout=180)
    np.testing.assert_allclose(output_array(reply), reference_forward(path, x), rtol=1e-4, atol=1e-5)
    # With no more traffic it goes back to zero after the downscale delay.
    await mesh.wait_deployment("sleepy", lambda d: d.target_replicas == 0 and not d.replicas, timeout_s=120)


async def test_unknown_models_and_versions_are_not_found(mesh: ServingMesh) -> None:
    import grpc

    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await mesh.gateway.ModelInfer(infer_request("nope", np.zeros((1, 64), np.float32)), timeout=30)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as bad_version:
        await mesh.gateway.ModelInfer(infer_request("batched", np.zeros((1, 64), np.float32), "99"), timeout=30)
    assert bad_version.value.code() == grpc.StatusCode.NOT_FOUND


async def test_the_command_line_deploys_infers_and_streams(mesh: ServingMesh, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import sys

    _, path = await mesh.push("cli-mlp", "mlp", MLP_ARGS, seed=6)
    await mesh.push("cli-lm", "decoder-lm", {"width": 32, "depth": 1, "heads": 2, "context": 32}, seed=7)
    env = {
        **os.environ,
        "MAAS_REGISTRY_ADDRESS": mesh.registry_address,
        "MAAS_SCHEDULER_ADDRESS": mesh.scheduler_address,
        "MAAS_GATEWAY_ADDRESS": mesh.gateway_address,
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.cli.main", *args], env=env, capture_output=True, text=True, timeout=240
        )

    def maas(*args: str) -> str:
        done = run(*args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    created = await asyncio.to_thread(maas, "deploy", "create", "cli-mlp", "--cpus", "0.5")
    assert "DEPLOYMENT_READY" in created
    await asyncio.to_thread(maas, "deploy", "create", "cli-lm", "--cpus", "0.5")
    assert "cli-mlp" in await asyncio.to_thread(maas, "deploy", "list")
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    await asyncio.to_thread(
        maas, "infer", "cli-mlp", "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npz")
    )
    np.testing.assert_allclose(np.load(tmp_path / "y.npz")["logits"], reference_forward(path, x), rtol=1e-4, atol=1e-5)
    # Byte-level generation: the prompt is echoed, then the streamed continuation.
    assert (await asyncio.to_thread(maas, "generate", "cli-lm", "hello", "--max-tokens", "5")).startswith("hello")
    await asyncio.to_thread(maas, "deploy", "delete", "cli-lm")
    missing = await asyncio.to_thread(run, "deploy", "show", "cli-lm")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
