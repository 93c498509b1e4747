"""The command line rebuilt on the SDK: ``maas models``, ``train``, ``deploy``, ``infer`` and ``generate``
through the ``maas`` entry point (typer's test runner, in a thread: a command runs its own event loop)
against real servers on loopback."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.scheduler.main import RunningScheduler
from services.scheduler.main import start as start_scheduler
from tests.contract import test_sdk_workloads as workloads
from tests.contract.test_cli_tenants import maas, ok
from tests.contract.test_scheduler_deployments import LoopbackPool

pytestmark = pytest.mark.timeout(120)
database_url = workloads.database_url
gateway = workloads.gateway


@pytest.fixture
async def mesh(
    registry: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[RunningScheduler, LoopbackPool]]:
    """A registry and a scheduler (jobs run by the stepping runner, replicas by the loopback pool)."""
    pool = LoopbackPool()
    runner = workloads.SteppingRunner()
    settings = workloads.scheduler_settings(
        tmp_path,
        scheduler_max_running_jobs=4,
        scheduler_registry_address=f"127.0.0.1:{registry.port}",
        scheduler_replica_default_cpus=0.5,
        scheduler_replica_health_interval_s=0.1,
        scheduler_replica_drain_delay_s=0.1,
        scheduler_replica_stop_grace_s=0.1,
    )
    scheduler = await start_scheduler(settings, lambda: runner, lambda: pool)
    monkeypatch.setenv("MAAS_REGISTRY_ADDRESS", f"127.0.0.1:{registry.port}")
    monkeypatch.setenv("MAAS_SCHEDULER_ADDRESS", f"127.0.0.1:{scheduler.port}")
    monkeypatch.setenv("MAAS_HOME", str(tmp_path / "cli-home"))
    monkeypatch.setenv("COLUMNS", "250")
    yield scheduler, pool
    await scheduler.server.stop(0.2)
    await pool.close_all()


async def test_models_commands(mesh: Any, tmp_path: Path) -> None:
    pushed = await ok("models", "push", "cli-mlp", "--zoo", "mlp", "--arg", "in_features=4", "--tag", "k=v")
    assert pushed.startswith("cli-mlp@1 sha256=")
    await ok("models", "push", "cli-mlp", "--zoo", "mlp", "--arg", "in_features=4")
    assert "cli-mlp" in await ok("models", "list", "--prefix", "cli-")
    assert '"number": "2"' in await ok("models", "show", "cli-mlp")  # JSON spells int64 as a string
    assert "cli-mlp@production -> 1" in await ok("models", "alias", "cli-mlp", "production", "1")
    dest = tmp_path / "pulled.safetensors"
    assert "sha256 verified" in await ok("models", "pull", "cli-mlp@production", "-o", str(dest))
    assert pushed.split("sha256=")[1].split()[0] == hashlib.sha256(dest.read_bytes()).hexdigest()
    refused = await maas("models", "delete", "cli-mlp")
    assert refused.exit_code == 1 and "FAILED_PRECONDITION" in refused.stderr
    await ok("models", "delete", "cli-mlp", "--force")
    missing = await maas("models", "show", "cli-mlp")
    assert missing.exit_code == 1 and "(NOT_FOUND)" in missing.stderr


async def test_train_and_deploy_commands(mesh: Any) -> None:
    submitted = await ok("train", "submit", "cli-digits", "--epochs", "1", "--workers", "1", "--shards", "1")
    job_id = submitted.split()[0]
    assert job_id.startswith("job-") and f"{job_id} SUCCEEDED" in submitted  # watched to the end
    assert "SUCCEEDED" in await ok("train", "status", job_id)
    assert job_id in await ok("train", "list", "--state", "succeeded")
    await ok("models", "push", "served", "--zoo", "mlp", "--arg", "in_features=4")
    created = await ok("deploy", "create", "served", "--min-replicas", "2")
    assert "served DEPLOYMENT_READY served@1 replicas 2/2 ready" in created
    assert "served" in await ok("deploy", "list")
    assert "REPLICA_READY" in await ok("deploy", "show", "served")
    assert "deleted served" in await ok("deploy", "delete", "served")


async def test_infer_and_generate_commands(gateway: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    running, _ = gateway
    monkeypatch.setenv("MAAS_GATEWAY_ADDRESS", f"127.0.0.1:{running.port}")
    monkeypatch.setenv("MAAS_HOME", str(tmp_path / "cli-home"))
    np.save(tmp_path / "x.npy", np.arange(8, dtype=np.float32).reshape(2, 4))
    printed = await ok("infer", "m", "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npz"))
    assert printed.startswith("m@1") and "argmax: [0, 0]" in printed
    np.testing.assert_allclose(np.load(tmp_path / "y.npz")["y"], [[7.0], [23.0]])
    assert (await ok("generate", "lm", "a", "--max-tokens", "3")).startswith("abcd")
