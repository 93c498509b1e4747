"""Off-the-shelf KServe v2 clients against the real mesh: Triton's Python gRPC client and grpcurl.

The mesh (registry, scheduler on the session's local Ray, gateway) runs in this process
(``tests.support.serving.ServingMesh``); the inference workers are real Ray actors. tritonclient's generated
code registers the same ``inference.*`` protobuf symbols as the project's stubs, so it runs in a child
process: ``tests/contract/kserve_client/triton_checks.py`` exercises every gateway RPC and prints one JSON
document, which the tests here assert on (predictions against an in-process forward, status codes).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from inference import grpc_service_pb2 as kpb

from tests.support.serving import ServingMesh, reference_forward

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SCRIPT = Path(__file__).resolve().parents[1] / "contract" / "kserve_client" / "triton_checks.py"
MLP = {"in_features": 16, "hidden": [32], "out_features": 4}
LM = {"vocab_size": 64, "context": 32, "width": 32, "depth": 1, "heads": 2}
# Replicas ask for half a logical CPU so that these deployments fit beside other modules' on the session Ray.
RESOURCES = {"cpus": 0.5}
MAX_BATCH = 8
PROMPT = [1, 2, 3, 4, 5]
MAX_TOKENS = 8
SCRIPT_TIMEOUT_S = 420.0


async def _wait_gateway_ready(mesh: ServingMesh, name: str, timeout_s: float = 60.0) -> None:
    """The scheduler says READY before the gateway has necessarily seen the endpoint snapshot."""
    deadline = time.monotonic() + timeout_s
    while True:
        reply = await mesh.gateway.ModelReady(kpb.ModelReadyRequest(name=name), timeout=10)
        if reply.ready:
            return
        assert time.monotonic() < deadline, f"the gateway never reported {name} ready"
        await asyncio.sleep(0.2)


async def _run(*argv: str, timeout_s: float = SCRIPT_TIMEOUT_S) -> tuple[int, str, str]:
    # A child process, awaited: the servers under test run on this process's event loop.
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture(scope="module")
async def mesh(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ServingMesh]:
    mesh = ServingMesh(tmp_path_factory.mktemp("kserve-clients"))
    await mesh.start()
    yield mesh
    await mesh.stop()


@pytest.fixture(scope="module")
async def models(mesh: ServingMesh) -> dict[str, Any]:
    """mlp@1 (alias prod) and a decoder-lm deployed; spare pushed but not deployed (for load_model)."""
    version, mlp_path = await mesh.push("mlp", "mlp", MLP, seed=1)
    await mesh.alias("mlp", "prod", version)
    _, lm_path = await mesh.push("lm", "decoder-lm", LM, seed=2)
    _, spare_path = await mesh.push("spare", "mlp", MLP, seed=3)
    batching = {"max_batch_size": MAX_BATCH, "max_queue_delay_us": 2000}
    await asyncio.gather(
        mesh.deploy(model="mlp", min_replicas=1, resources=RESOURCES, batching=batching),
        mesh.deploy(model="lm", min_replicas=1, resources=RESOURCES),
    )
    await _wait_gateway_ready(mesh, "mlp")
    await _wait_gateway_ready(mesh, "lm")
    return {"version": version, "mlp": mlp_path, "lm": lm_path, "spare": spare_path}


@pytest.fixture(scope="module")
async def report(mesh: ServingMesh, models: dict[str, Any]) -> dict[str, Any]:
    code, out, err = await _run(
        sys.executable,
        str(SCRIPT),
        "--url",
        mesh.gateway_address,
        "--model",
        "mlp",
        "--version",
        str(models["version"]),
        "--alias",
        "prod",
        "--stream-model",
        "lm",
        "--load-model",
        "spare",
        "--prompt",
        ",".join(map(str, PROMPT)),
        "--max-tokens",
        str(MAX_TOKENS),
    )
    assert code == 0, f"triton_checks.py exited with {code}:\n{err[-3000:]}"
    return json.loads(out)


def _ok(report: dict[str, Any], name: str) -> Any:
    result = report["checks"][name]
    assert result["ok"], f"{name}: {result}"
    return result["value"]


def _status(report: dict[str, Any], name: str) -> tuple[str, str]:
    result = report["checks"][name]
    assert not result["ok"], f"{name} should have failed: {result}"
    return result["status"], result["message"]


async def test_server_and_model_metadata(report: dict[str, Any], models: dict[str, Any]) -> None:
    assert _ok(report, "server_live") is True
    assert _ok(report, "server_ready") is True
    server = _ok(report, "server_metadata")
    assert server["name"] == "maas"
    # Only extensions that really work may be claimed; shared memory is not among them.
    assert not {"system_shared_memory", "cuda_shared_memory"} & set(server.get("extensions", []))
    assert _ok(report, "model_ready") is True
    assert _ok(report, "model_ready_version") is True
    unknown = report["checks"]["model_ready_unknown"]
    assert unknown.get("value") is False or unknown.get("status") == "StatusCode.NOT_FOUND", unknown

    metadata = _ok(report, "model_metadata")
    assert metadata["name"] == "mlp"
    assert str(models["version"]) in metadata["versions"]
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in metadata["inputs"]] == [
        ("input", "FP32", [-1, MLP["in_features"]])
    ]
    assert [(t["name"], t["datatype"]) for t in metadata["outputs"]] == [("logits", "FP32")]

    config = _ok(report, "model_config")["config"]
    assert config["name"] == "mlp"
    assert int(config["max_batch_size"]) == MAX_BATCH
    # Triton's shape: dims without the batch dimension when max_batch_size > 0.
    assert [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in config["input"]] == [
        ("input", "TYPE_FP32", [MLP["in_features"]])
    ]


async def test_infer_matches_in_process_forward(report: dict[str, Any], models: dict[str, Any]) -> None:
    x1 = np.asarray(report["inputs"]["x1"], dtype=np.float32)
    x4 = np.asarray(report["inputs"]["x4"], dtype=np.float32)
    expected1 = reference_forward(models["mlp"], x1)
    expected4 = reference_forward(models["mlp"], x4)
    version = str(models["version"])
    checks = ["infer", "infer_requested_outputs", "infer_version_number", "infer_version_alias"]
    for name in checks:
        value = _ok(report, name)
        assert value["model_name"] == "mlp" and value["model_version"] == version, (name, value)
        assert value["outputs"] == ["logits"], (name, value)
        np.testing.assert_allclose(np.asarray(value["logits"]), expected1, rtol=1e-4, atol=1e-5, err_msg=name)
    assert _ok(report, "infer")["id"] == "req-1"
    batch = _ok(report, "infer_batch4")
    np.testing.assert_allclose(np.asarray(batch["logits"]), expected4, rtol=1e-4, atol=1e-5)


async def test_bad_requests_get_the_right_status(report: dict[str, Any]) -> None:
    status, message = _status(report, "infer_unknown_model")
    assert status == "StatusCode.NOT_FOUND" and "no-such-model" in message, message
    status, message = _status(report, "infer_unknown_version")
    assert status == "StatusCode.NOT_FOUND" and "999" in message, message
    status, message = _status(report, "infer_wrong_shape")
    assert status == "StatusCode.INVALID_ARGUMENT" and "input" in message, message
    status, message = _status(report, "infer_wrong_input_name")
    assert status == "StatusCode.INVALID_ARGUMENT" and "nope" in message, message
    status, message = _status(report, "unload_unknown")
    assert status == "StatusCode.NOT_FOUND", message


async def test_stream_yields_greedy_tokens_then_final_response(report: dict[str, Any], models: dict[str, Any]) -> None:
    from shared.artifacts import greedy_generate, load_artifact

    stream = _ok(report, "stream")
    model: Any = load_artifact(models["lm"])
    expected = list(greedy_generate(model, PROMPT, MAX_TOKENS))
    assert stream["errors"] == []
    assert stream["tokens"] == expected
    assert stream["final_seen"] is True
    assert stream["ids"] == ["stream-1"]


async def test_statistics_and_repository_index(report: dict[str, Any], models: dict[str, Any]) -> None:
    stats = _ok(report, "statistics")["model_stats"]
    mlp = [s for s in stats if s["name"] == "mlp"]
    assert mlp, stats
    # Before the statistics call the script ran 5 successful inferences of mlp: 8 samples in all.
    assert sum(int(s.get("inference_count", 0)) for s in mlp) >= 8, mlp
    assert sum(int(s.get("inference_stats", {}).get("success", {}).get("count", 0)) for s in mlp) >= 5, mlp
    every = {s["name"] for s in _ok(report, "statistics_all")["model_stats"]}
    assert {"mlp", "lm"} <= every, every

    index = {m["name"]: m for m in _ok(report, "repository_index")["models"]}
    assert index["mlp"].get("state") == "READY", index
    assert index["lm"].get("state") == "READY", index
    assert "spare" in index and index["spare"].get("state") != "READY", index


async def test_load_and_unload_model(report: dict[str, Any], models: dict[str, Any]) -> None:
    _ok(report, "load_model")
    assert _ok(report, "load_model_ready") is True
    loaded = _ok(report, "load_model_infer")
    x1 = np.asarray(report["inputs"]["x1"], dtype=np.float32)
    assert loaded["model_name"] == "spare"
    np.testing.assert_allclose(
        np.asarray(loaded["logits"]), reference_forward(models["spare"], x1), rtol=1e-4, atol=1e-5
    )
    _ok(report, "unload_model")
    assert _ok(report, "unload_model_ready") is False


async def test_grpcurl_lists_the_services_through_reflection(mesh: ServingMesh) -> None:
    grpcurl = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    code, out, err = await _run(grpcurl, "-plaintext", "-max-time", "20", mesh.gateway_address, "list", timeout_s=60)
    assert code == 0, err
    services = set(out.split())
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services, out
    code, out, err = await _run(
        grpcurl,
        "-plaintext",
        "-max-time",
        "20",
        mesh.gateway_address,
        "inference.GRPCInferenceService/ServerLive",
        timeout_s=60,
    )
    assert code == 0 and json.loads(out).get("live") is True, (out, err)
