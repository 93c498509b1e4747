"""Signed models and verification on every load: a real registry, a real worker, the real ``model_signing``.

Signatures are OpenSSF Model Signing bundles made with elliptic-curve keys (offline). The worker re-hashes
every artifact it loads (its cache included) and, where a deployment requires a signature, loads only bytes
a key trusted by the model's tenant signed.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import model_signing
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from inference import grpc_service_pb2 as kpb
from inference import grpc_service_pb2_grpc
from maas.inference.v1 import worker_pb2 as wpb
from maas.inference.v1 import worker_pb2_grpc
from maas.registry.v1 import registry_pb2 as pb

from services.inference.main import RunningWorker
from shared.artifacts import signing
from tests.contract import test_inference_worker
from tests.contract.test_inference_worker import MLP, output, push, raw_request

PUBLIC_INFO = serialization.PublicFormat.SubjectPublicKeyInfo


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'registry.db'}"


def make_key(directory: Path, name: str) -> tuple[Path, bytes]:
    """A P-256 private key file and its public key PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    path = directory / f"{name}.pem"
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return path, public


def sign_with_library(artifact: Path, private_key: Path, out: Path) -> bytes:
    """A signature made with model_signing's public API directly, as a user would outside maas."""
    model_signing.signing.Config().use_elliptic_key_signer(private_key=private_key).sign(artifact, out)
    return out.read_bytes()


# A real worker against the registry fixture, as the worker's own contract tests start it.
worker = test_inference_worker.worker


@pytest.fixture
async def control(worker: RunningWorker) -> AsyncIterator[worker_pb2_grpc.InferenceWorkerStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
        yield worker_pb2_grpc.InferenceWorkerStub(channel)


async def load(control: Any, model: str, version: int, require_signature: bool) -> wpb.LoadedModel:
    request = wpb.LoadModelRequest(ref=wpb.ModelRef(model=model, version=version), require_signature=require_signature)
    return (await control.LoadModel(request)).model


async def refused(control: Any, model: str, version: int) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await load(control, model, version, True)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    return caught.value.details() or ""


async def sign_version(client: Any, model: str, version: str, bundle: bytes, public: bytes) -> pb.Version:
    request = pb.SignVersionRequest(
        ref=pb.VersionRef(model=model, version=version), signature=bundle, public_key_pem=public.decode()
    )
    return (await client.stub.SignVersion(request)).version


async def metadata(worker: RunningWorker, model: str) -> kpb.ModelMetadataResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response: kpb.ModelMetadataResponse = await stub.ModelMetadata(kpb.ModelMetadataRequest(name=model))
        return response


async def test_signatures_trust_policy_and_require_signature(registry_client, control, worker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    artifact = await push(registry_client, tmp_path, "signed", "mlp", MLP)
    digest = hashlib.sha256(artifact.read_bytes()).hexdigest()
    alice_key, alice_pub = make_key(tmp_path, "alice")
    _, mallory_pub = make_key(tmp_path, "mallory")

    # Unsigned: refused where a signature is required, loaded where it is not.
    assert "not signed" in await refused(control, "signed", 1)
    assert (await load(control, "signed", 1, False)).sha256 == digest
    assert not (await metadata(worker, "signed")).parameters  # no signer to report
    assert "unsigned" in await refused(control, "signed", 1)  # loaded without one is not good enough
    await control.UnloadModel(wpb.UnloadModelRequest(ref=wpb.ModelRef(model="signed", version=1)))

    # A signature over other bytes is refused when it is added.
    other = await push(registry_client, tmp_path, "other", "mlp", MLP, seed=1)
    wrong = sign_with_library(other, alice_key, tmp_path / "wrong.sig")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sign_version(registry_client, "signed", "1", wrong, alice_pub)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not version 1's" in (caught.value.details() or "")
    # So is one that does not verify with the key it names.
    good = sign_with_library(artifact, alice_key, tmp_path / "good.sig")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sign_version(registry_client, "signed", "1", good, mallory_pub)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # A signature made with model_signing's API directly is accepted; GetVersion reports it.
    version = await sign_version(registry_client, "signed", "1", good, alice_pub)
    assert [(s.key_id, s.sha256) for s in version.signatures] == [(signing.key_id(alice_pub), digest)]
    got = (await registry_client.stub.GetVersion(pb.GetVersionRequest(ref=pb.VersionRef(model="signed")))).version
    assert got.signatures[0].sha256 == digest and got.signatures[0].bundle == good

    # Signed, but by a key the tenant does not trust.
    assert "not trusted" in await refused(control, "signed", 1)
    await registry_client.stub.AddTrustedKey(
        pb.AddTrustedKeyRequest(name="mallory", public_key_pem=mallory_pub.decode())
    )
    assert "not trusted" in await refused(control, "signed", 1)

    # Trusted: loads, and reports the signer and the digest of the bytes it loaded.
    await registry_client.stub.AddTrustedKey(pb.AddTrustedKeyRequest(name="alice", public_key_pem=alice_pub.decode()))
    loaded = await load(control, "signed", 1, True)
    assert loaded.sha256 == digest
    assert loaded.signers == [f"alice ({signing.key_id(alice_pub)[:16]})"]
    # ModelMetadata reports them too (a maas extension of Triton's response: its parameters).
    parameters = (await metadata(worker, "signed")).parameters
    assert {k: v.string_param for k, v in parameters.items()} == {"signers": loaded.signers[0], "sha256": digest}
    policy = await registry_client.stub.GetTrustPolicy(pb.GetTrustPolicyRequest(model="signed"))
    assert [k.name for k in policy.keys] == ["alice", "mallory"]


async def test_derived_variants_are_new_bytes_signed_anew(registry_client, control, tmp_path) -> None:  # type: ignore[no-untyped-def]
    artifact = await push(registry_client, tmp_path, "parent", "mlp", MLP)
    key, public = make_key(tmp_path, "team")
    await registry_client.stub.AddTrustedKey(pb.AddTrustedKeyRequest(name="team", public_key_pem=public.decode()))
    await sign_version(registry_client, "parent", "1", signing.sign_file(artifact, key), public)
    await load(control, "parent", 1, True)
    derived = (
        await registry_client.stub.DeriveVersion(
            pb.DeriveVersionRequest(ref=pb.VersionRef(model="parent", version="1"), variant="int8")
        )
    ).version
    assert not derived.signatures
    assert "not signed" in await refused(control, "parent", derived.number)
    fetched = tmp_path / "derived.safetensors"
    await registry_client.download_file(pb.VersionRef(model="parent", version=str(derived.number)), fetched)
    await sign_version(registry_client, "parent", str(derived.number), signing.sign_file(fetched, key), public)
    assert (await load(control, "parent", derived.number, True)).signers


def test_a_signature_made_here_verifies_with_model_signing_directly(tmp_path: Path) -> None:
    artifact = tmp_path / "model.safetensors"
    artifact.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}" + bytes(range(256)) * 64)
    key, public = make_key(tmp_path, "k")
    (tmp_path / "pub.pem").write_bytes(public)
    (tmp_path / "model.sig").write_bytes(signing.sign_file(artifact, key))
    verifier = model_signing.verifying.Config().use_elliptic_key_verifier(public_key=tmp_path / "pub.pem")
    verifier.verify(artifact, tmp_path / "model.sig")  # raises on failure
    artifact.write_bytes(artifact.read_bytes() + b"!")
    with pytest.raises(ValueError, match="Signature mismatch"):
        model_signing.verifying.Config().use_elliptic_key_verifier(public_key=tmp_path / "pub.pem").verify(
            artifact, tmp_path / "model.sig"
        )


async def test_a_flipped_bit_in_the_worker_cache_is_evicted_and_downloaded_again(  # type: ignore[no-untyped-def]
    registry_client, control, worker, tmp_path
) -> None:
    artifact = await push(registry_client, tmp_path, "cached", "mlp", MLP)
    digest = hashlib.sha256(artifact.read_bytes()).hexdigest()
    x = np.random.default_rng(0).standard_normal((8, MLP["in_features"])).astype(np.float32)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
        kserve = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        await load(control, "cached", 1, False)
        expected = output(await kserve.ModelInfer(raw_request("cached", x)))
        await control.UnloadModel(wpb.UnloadModelRequest(ref=wpb.ModelRef(model="cached", version=1)))
        cached = next((tmp_path / "home").rglob(f"{digest}.safetensors"))
        data = bytearray(cached.read_bytes())
        data[len(data) - 10] ^= 0x40  # a weight, not the header: only a hash can tell
        cached.write_bytes(bytes(data))
        # The cached copy is loaded while it is re-hashed; the module built from the altered bytes is
        # discarded, never served: the answers are those of the registry's bytes.
        loaded = await load(control, "cached", 1, False)
        np.testing.assert_array_equal(output(await kserve.ModelInfer(raw_request("cached", x))), expected)
    assert loaded.sha256 == digest
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == digest
    assert not list(cached.parent.glob("*.part"))


async def test_cli_pushes_signed_and_signs_later(registry, registry_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    import os
    import sys

    key, public = make_key(tmp_path, "cli")
    env = {**os.environ, "MAAS_REGISTRY_ADDRESS": f"127.0.0.1:{registry.port}", "MAAS_HOME": str(tmp_path / "cli")}

    async def maas(*args: str) -> str:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.cli.main",
            *args,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
        assert process.returncode == 0, output.decode()
        return output.decode()

    await maas("models", "push", "cli-signed", "--zoo", "mlp", "--arg", "in_features=8", "--sign", str(key))
    await maas("models", "push", "cli-signed", "--zoo", "mlp", "--arg", "in_features=8")
    await maas("models", "sign", "cli-signed@2", "--key", str(key))
    for number in ("1", "2"):
        ref = pb.VersionRef(model="cli-signed", version=number)
        version = (await registry_client.stub.GetVersion(pb.GetVersionRequest(ref=ref))).version
        assert [s.key_id for s in version.signatures] == [signing.key_id(public)]
        assert version.signatures[0].sha256 == version.sha256


def mint(
    directory: Path, name: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None, *, ca: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path, Path]:
    """A certificate (a CA's, or a code-signing leaf's) and its key, issued by ``issuer`` (None: self-signed).
    Returns them with the PEM files of the certificate and the key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = issuer if issuer is not None else (None, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)  # cert and CRL sign
    else:
        usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)  # digital signature
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
    cert = builder.add_extension(usage, critical=True).sign(issuer_key, hashes.SHA256())
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert, key, cert_path, key_path


async def test_a_trusted_ca_certificate_trusts_the_signing_certificates_it_issued(  # type: ignore[no-untyped-def]
    registry_client, control, worker, tmp_path
) -> None:
    artifact = await push(registry_client, tmp_path, "certified", "mlp", MLP)
    root_a, root_a_key, root_a_path, _ = mint(tmp_path, "root-a", None, ca=True)
    middle, middle_key, middle_path, _ = mint(tmp_path, "intermediate-a", (root_a, root_a_key), ca=True)
    leaf, _, leaf_path, leaf_key_path = mint(tmp_path, "team-a", (middle, middle_key), ca=False)
    _, _, root_b_path, _ = mint(tmp_path, "root-b", None, ca=True)

    # Signed with model_signing's certificate signer: the bundle carries the leaf and the intermediate, and
    # the registry needs no public key for it (it checks the signature with the leaf's key).
    bundle = signing.sign_file(artifact, leaf_key_path, certificate=leaf_path, chain=(middle_path,))
    version = await sign_version(registry_client, "certified", "1", bundle, b"")
    leaf_key_id = signing.key_id(leaf.public_key().public_bytes(serialization.Encoding.PEM, PUBLIC_INFO))
    assert [s.key_id for s in version.signatures] == [leaf_key_id]
    # The same signature verifies with model_signing's own certificate verifier and the root.
    model_signing.verifying.Config().use_certificate_verifier(certificate_chain=[root_a_path]).verify(
        artifact, _write(tmp_path / "model.sig", bundle)
    )

    assert "not trusted" in await refused(control, "certified", 1)
    # A leaf certificate is no trust anchor: only CA certificates are.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry_client.stub.AddTrustedKey(
            pb.AddTrustedKeyRequest(name="leaf", public_key_pem=leaf_path.read_text())
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a CA certificate" in (caught.value.details() or "")

    # Another CA's root does not vouch for this certificate.
    await registry_client.stub.AddTrustedKey(
        pb.AddTrustedKeyRequest(name="ca-b", public_key_pem=root_b_path.read_text())
    )
    assert "'ca-b': the signature does not verify with the trusted CA" in await refused(control, "certified", 1)

    # The issuing root does, through the intermediate the bundle carries.
    await registry_client.stub.AddTrustedKey(
        pb.AddTrustedKeyRequest(name="ca-a", public_key_pem=root_a_path.read_text())
    )
    loaded = await load(control, "certified", 1, True)
    assert loaded.signers == [f"ca-a ({leaf_key_id[:16]})"]
    policy = await registry_client.stub.GetTrustPolicy(pb.GetTrustPolicyRequest(model="certified"))
    anchors = {k.name: k.key_id for k in policy.keys}
    assert anchors["ca-a"] == hashlib.sha256(root_a.public_bytes(serialization.Encoding.DER)).hexdigest()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
