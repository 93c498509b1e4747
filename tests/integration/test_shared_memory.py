"""Triton's system shared-memory utilities end to end on the real mesh (registry, scheduler on the session's
local Ray, gateway with the extension on; the inference worker a real Ray actor on this host).

``tests/contract/kserve_client/triton_shm.py`` drives ``tritonclient.utils.shared_memory`` unchanged in a child
process (tritonclient's generated code cannot share this process): create, set, register, infer with the
input and the output in shared memory, read the output from its region, unregister, destroy; and the bad
regions. The outputs are compared with an in-process forward of the same artifact.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.integration.test_kserve_clients import RESOURCES, _ok, _run, _status, _wait_gateway_ready
from tests.support.serving import ServingMesh, reference_forward

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SCRIPT = Path(__file__).resolve().parents[1] / "contract" / "kserve_client" / "triton_shm.py"
MLP = {"in_features": 16, "hidden": [32], "out_features": 4}


@pytest.fixture(scope="module")
async def mesh(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ServingMesh]:
    mesh = ServingMesh(tmp_path_factory.mktemp("shared-memory"))
    await mesh.start(gateway_settings={"gateway_shared_memory": True})
    yield mesh
    await mesh.stop()


@pytest.fixture(scope="module")
async def report(mesh: ServingMesh) -> dict[str, Any]:
    _, path = await mesh.push("shm-mlp", "mlp", MLP, seed=5)
    await mesh.deploy(model="shm-mlp", min_replicas=1, resources=RESOURCES, batching={"max_batch_size": 8})
    await _wait_gateway_ready(mesh, "shm-mlp")
    argv = ["--url", mesh.gateway_address, "--model", "shm-mlp", "--width", str(MLP["in_features"])]
    code, out, err = await _run(sys.executable, str(SCRIPT), *argv)
    assert code == 0, f"triton_shm.py exited with {code}:\n{err[-3000:]}"
    return {"path": path, **json.loads(out)}


async def test_register_infer_read_unregister(report: dict[str, Any]) -> None:
    assert "system_shared_memory" in _ok(report, "extensions")
    _ok(report, "register_input")
    _ok(report, "register_output")
    status = _ok(report, "status")
    assert set(status) == {"input_data", "output_data"}, status
    x_bytes = np.asarray(report["x"], dtype=np.float32).nbytes
    assert status["input_data"]["key"].startswith("/maas_e2e_in_") and int(status["input_data"]["byte_size"]) == x_bytes

    result = _ok(report, "infer")
    x = np.asarray(report["x"], dtype=np.float32)
    assert result["shape"] == [x.shape[0], MLP["out_features"]] and result["datatype"] == "FP32"
    assert result["raw_output_contents"] == [0], "the output's data must be in its region only"
    np.testing.assert_allclose(
        np.asarray(result["logits"], dtype=np.float32), reference_forward(report["path"], x), rtol=1e-4, atol=1e-5
    )

    _ok(report, "unregister_input")
    assert set(_ok(report, "status_after_unregister")) == {"output_data"}
    _ok(report, "unregister_all")
    assert _ok(report, "status_at_end") == {}


async def test_bad_regions(report: dict[str, Any]) -> None:
    status, message = _status(report, "infer_unknown_region")
    assert status == "StatusCode.NOT_FOUND" and "no_such_region" in message, message
    status, message = _status(report, "infer_out_of_bounds")
    assert status == "StatusCode.INVALID_ARGUMENT" and "input_data" in message, message
    status, message = _status(report, "infer_after_unregister")
    assert status == "StatusCode.NOT_FOUND" and "input_data" in message, message
