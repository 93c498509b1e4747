"""Encryption at rest and verification on download, through the registry's public API (real server, real stores).

A bit flipped in a stored blob, encrypted or not, on local disk or in an S3 bucket, ends the download with
DATA_LOSS before the last chunk: never served whole, and a client's download never accepts it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from maas.registry.v1 import registry_pb2 as pb

from shared.artifacts.crypto import MAGIC
from shared.clients.registry import RegistryClient
from shared.errors import DataLoss
from tests.contract.test_registry_s3 import BUCKET, s3, s3_endpoint, s3_registry  # noqa: F401 - fixtures
from tests.support.artifacts import as_stream, sha256, tiny_artifact, upload_messages

ARGS = {"in_features": 64, "hidden": [256], "out_features": 4}  # ~70 KiB: several 1 MiB-chunk-free pieces


def blob_path(settings: Any, digest: str) -> Path:
    return settings.artifact_dir() / "sha256" / digest[:2] / digest[2:4] / digest


def flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


async def download(client: RegistryClient, model: str, offset: int = 0, chunk_size: int = 0) -> bytes:
    request = pb.DownloadVersionRequest(ref=pb.VersionRef(model=model), offset=offset, chunk_size=chunk_size)
    return b"".join([m.chunk async for m in client.stub.DownloadVersion(request)])


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_blobs_are_ciphertext_on_disk_and_round_trip(
    registry, registry_client, registry_settings, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    path, manifest = tiny_artifact(tmp_path, arguments=ARGS)
    data = path.read_bytes()
    version = (await registry_client.stub.UploadVersion(as_stream(upload_messages("enc", data, manifest)))).version
    stored = blob_path(registry_settings, version.sha256).read_bytes()
    assert stored.startswith(MAGIC)
    assert data[:4096] not in stored and data[-4096:] not in stored
    assert await download(registry_client, "enc") == data
    for offset in (1, 1000, len(data) // 2, len(data) - 1, len(data)):
        assert await download(registry_client, "enc", offset, chunk_size=1000) == data[offset:]
    dest = tmp_path / "back.safetensors"
    await registry_client.download_file(pb.VersionRef(model="enc"), dest)
    assert dest.read_bytes() == data
    # Content addressing by the plaintext: the same bytes under another model are stored once.
    await registry_client.stub.UploadVersion(as_stream(upload_messages("enc-copy", data, manifest)))
    assert len(list((registry_settings.artifact_dir() / "sha256").glob("*/*/*"))) == 1
    # Derivation reads an encrypted parent.
    derived = (
        await registry_client.stub.DeriveVersion(
            pb.DeriveVersionRequest(ref=pb.VersionRef(model="enc"), variant="fp16")
        )
    ).version
    assert blob_path(registry_settings, derived.sha256).read_bytes().startswith(MAGIC)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("encryption", [True, False])
async def test_a_flipped_bit_in_a_stored_blob_is_never_served(registry_settings, tmp_path, encryption: bool) -> None:  # type: ignore[no-untyped-def]
    from services.registry.main import start

    settings = registry_settings.model_copy(update={"registry_encryption": encryption})
    running = await start(settings)
    client = RegistryClient.connect(f"127.0.0.1:{running.port}", settings)
    try:
        path, manifest = tiny_artifact(tmp_path, arguments=ARGS)
        data = path.read_bytes()
        await client.stub.UploadVersion(as_stream(upload_messages("flip", data, manifest)))
        stored = blob_path(settings, sha256(data))
        assert stored.read_bytes().startswith(MAGIC) is encryption
        flip(stored, len(stored.read_bytes()) - 100)
        for offset in (0, len(data) // 2):
            received = bytearray()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                request = pb.DownloadVersionRequest(ref=pb.VersionRef(model="flip"), offset=offset, chunk_size=4096)
                async for message in client.stub.DownloadVersion(request):
                    received += message.chunk
            assert caught.value.code() == grpc.StatusCode.DATA_LOSS
            assert "integrity check" in (caught.value.details() or "")
            assert len(received) < len(data) - offset  # the tail is held back until the digest matches
        with pytest.raises(DataLoss):
            await client.download_file(pb.VersionRef(model="flip"), tmp_path / "never.safetensors")
        assert not (tmp_path / "never.safetensors").exists()
        # Deriving from a corrupt parent is refused too: no new bytes are made from bad ones.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.stub.DeriveVersion(pb.DeriveVersionRequest(ref=pb.VersionRef(model="flip"), variant="fp16"))
        assert caught.value.code() == grpc.StatusCode.DATA_LOSS
    finally:
        await client.close()
        await running.server.stop(0.2)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_s3_objects_are_encrypted_resumable_and_checked(s3, s3_registry, tmp_path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    _, client = s3_registry
    path, manifest = tiny_artifact(tmp_path, arguments=ARGS)
    data = path.read_bytes()
    await client.stub.UploadVersion(as_stream(upload_messages("s3enc", data, manifest)))
    key = f"team-a/sha256/{sha256(data)}"
    stored = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert stored.startswith(MAGIC) and data[:4096] not in stored
    assert await download(client, "s3enc") == data
    assert await download(client, "s3enc", len(data) // 3, chunk_size=999) == data[len(data) // 3 :]
    tampered = bytearray(stored)
    tampered[len(stored) // 2] ^= 0x80
    s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(tampered))
    with pytest.raises(DataLoss):
        await client.download_file(pb.VersionRef(model="s3enc"), tmp_path / "never.safetensors")
