"""``require_signature`` end to end on a real local Ray: registry -> scheduler -> inference-worker actors ->
gateway. A version a trusted key signed deploys and serves, and the gateway's ModelMetadata names its signer
and digest; an unsigned version and one signed by a key the tenant does not trust are refused with
FAILED_PRECONDITION before any replica starts."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from inference import grpc_service_pb2 as kpb
from maas.registry.v1 import registry_pb2 as rpb
from maas.scheduler.v1 import scheduler_pb2 as spb

from shared.artifacts import signing
from tests.support.serving import ServingMesh, infer_request, output_array, reference_forward

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MLP = {"in_features": 16, "hidden": [32], "out_features": 4}
RESOURCES = {"cpus": 0.5}


@pytest.fixture(scope="module")
async def mesh(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ServingMesh]:
    mesh = ServingMesh(tmp_path_factory.mktemp("signed"))
    await mesh.start(scheduler_replica_health_interval_s=0.5)
    yield mesh
    await mesh.stop()


def make_key(path: Path) -> bytes:
    """Writes a P-256 private key to ``path``; returns its public key PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


async def refused(mesh: ServingMesh, version: int) -> str:
    spec = spb.DeploymentSpec(model="signed", version=str(version), require_signature=True, resources=RESOURCES)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.scheduler.CreateDeployment(spb.CreateDeploymentRequest(spec=spec), timeout=60)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value
    return caught.value.details() or ""


async def test_require_signature_deploys_only_versions_a_trusted_key_signed(mesh: ServingMesh, tmp_path: Path) -> None:
    trusted_pub, untrusted_pub = make_key(tmp_path / "team.pem"), make_key(tmp_path / "other.pem")
    await mesh.registry.call(
        "AddTrustedKey", rpb.AddTrustedKeyRequest(name="team", public_key_pem=trusted_pub.decode())
    )
    unsigned, _ = await mesh.push("signed", "mlp", MLP, seed=1)
    by_other, other_path = await mesh.push("signed", "mlp", MLP, seed=2)
    by_team, team_path = await mesh.push("signed", "mlp", MLP, seed=3)
    await mesh.registry.sign_file(
        rpb.VersionRef(model="signed", version=str(by_other)), other_path, tmp_path / "other.pem"
    )
    await mesh.registry.sign_file(
        rpb.VersionRef(model="signed", version=str(by_team)), team_path, tmp_path / "team.pem"
    )

    assert "the version is not signed" in await refused(mesh, unsigned)
    details = await refused(mesh, by_other)
    assert "not trusted" in details and signing.key_id(untrusted_pub)[:16] in details
    listed = await mesh.scheduler.ListDeployments(spb.ListDeploymentsRequest())
    assert not list(listed.deployments)  # nothing was stored, no replica started

    deployment = await mesh.deploy(model="signed", version=str(by_team), require_signature=True, resources=RESOURCES)
    assert deployment.spec.require_signature
    x = np.random.default_rng(0).standard_normal((2, MLP["in_features"])).astype(np.float32)
    reply = await mesh.gateway.ModelInfer(infer_request("signed", x), timeout=60)
    np.testing.assert_allclose(output_array(reply), reference_forward(team_path, x), rtol=1e-5, atol=1e-6)

    # The gateway's ModelMetadata names who signed the bytes the replica loaded, and their digest.
    metadata = await mesh.gateway.ModelMetadata(kpb.ModelMetadataRequest(name="signed"), timeout=30)
    version = (
        await mesh.registry.call("GetVersion", rpb.GetVersionRequest(ref=rpb.VersionRef(model="signed")))
    ).version
    parameters = {key: value.string_param for key, value in metadata.parameters.items()}
    assert parameters == {"signers": f"team ({signing.key_id(trusted_pub)[:16]})", "sha256": version.sha256}
    # Triton's own client reads the response (the extension is a field it does not know, and skips).
    assert await triton_metadata(mesh.gateway_address, "signed") == ["signed", "input"]

    # An update to a version without a trusted signature is refused as well; the deployment keeps serving.
    update = spb.DeploymentSpec(model="signed", version=str(unsigned), require_signature=True, resources=RESOURCES)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.scheduler.UpdateDeployment(spb.UpdateDeploymentRequest(spec=update), timeout=60)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (await mesh.gateway.ModelInfer(infer_request("signed", x), timeout=60)).outputs
    await mesh.scheduler.DeleteDeployment(spb.DeleteDeploymentRequest(name="signed"), timeout=60)


async def triton_metadata(address: str, model: str) -> list[str]:
    # tritonclient registers the same protobuf symbols as the project's stubs: it runs in a child process.
    script = (
        "import json, sys, tritonclient.grpc as g\n"
        "m = g.InferenceServerClient(sys.argv[1]).get_model_metadata(sys.argv[2])\n"
        "print(json.dumps([m.name, m.inputs[0].name]))\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, address, model, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    result: list[str] = json.loads(out)
    return result
