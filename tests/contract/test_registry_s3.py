"""The registry on S3-compatible storage (moto's S3 server on loopback) with the same public API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import boto3
import pytest
from maas.registry.v1 import registry_pb2 as pb
from moto.server import ThreadedMotoServer

from shared.clients.registry import RegistryClient
from shared.errors import NotFound
from tests.support.artifacts import as_stream, sha256, tiny_artifact, upload_messages

BUCKET = "maas-artifacts"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    yield client
    for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        client.delete_object(Bucket=BUCKET, Key=item["Key"])


@pytest.fixture
async def s3_registry(s3, s3_endpoint: str, registry_settings) -> AsyncIterator[tuple[object, RegistryClient]]:  # type: ignore[no-untyped-def]
    from services.registry.main import start

    settings = registry_settings.model_copy(
        update={"registry_artifact_url": f"s3://{BUCKET}/team-a", "registry_s3_endpoint_url": s3_endpoint}
    )
    running = await start(settings)
    client = RegistryClient.connect(f"127.0.0.1:{running.port}", settings)
    yield running, client
    await client.close()
    await running.server.stop(0.2)


def objects(s3) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET).get("Contents", []))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_versions_live_in_the_bucket(s3, s3_registry, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, client = s3_registry
    path, manifest = tiny_artifact(tmp_path, arguments={"in_features": 32, "hidden": [64], "out_features": 4})
    data = path.read_bytes()
    version = (await client.stub.UploadVersion(as_stream(upload_messages("s3m", data, manifest)))).version
    assert objects(s3) == [f"team-a/sha256/{sha256(data)}"]
    await client.stub.UploadVersion(as_stream(upload_messages("s3copy", data, manifest)))
    assert len(objects(s3)) == 1  # content-addressed: stored once
    dest = tmp_path / "back.safetensors"
    await client.download_file(pb.VersionRef(model="s3m", version=str(version.number)), dest)
    assert dest.read_bytes() == data
    half = len(data) // 2
    tail = [
        m.chunk
        async for m in client.stub.DownloadVersion(
            pb.DownloadVersionRequest(ref=pb.VersionRef(model="s3m"), offset=half, chunk_size=1000)
        )
        if not m.HasField("version")
    ]
    assert b"".join(tail) == data[half:]
    derived = await client.call(
        "DeriveVersion", pb.DeriveVersionRequest(ref=pb.VersionRef(model="s3m"), variant="int8")
    )
    assert derived.version.lineage.parent_version == 1 and len(objects(s3)) == 2
    await client.call("DeleteModel", pb.DeleteModelRequest(name="s3m"))
    await client.call("DeleteModel", pb.DeleteModelRequest(name="s3copy"))
    assert objects(s3) == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_cancelled_s3_upload_leaves_nothing(s3, s3_registry, tmp_path) -> None:  # type: ignore[no-untyped-def]
    running, client = s3_registry
    path, manifest = tiny_artifact(tmp_path, arguments={"in_features": 256, "hidden": [1024], "out_features": 4})
    messages = upload_messages("gone", path.read_bytes(), manifest, chunk=32 * 1024)
    halfway = asyncio.Event()

    async def stream():  # type: ignore[no-untyped-def]
        for i, message in enumerate(messages):
            yield message
            if i == len(messages) // 2:
                halfway.set()
                await asyncio.sleep(30)

    call = client.stub.UploadVersion(stream())
    await asyncio.wait_for(halfway.wait(), 10)
    await asyncio.sleep(0.3)
    call.cancel()
    spool = running.core._store._spool  # the local spool of uploads in progress
    for _ in range(50):
        if not list(spool.iterdir()):
            break
        await asyncio.sleep(0.1)
    assert list(spool.iterdir()) == [] and objects(s3) == []
    with pytest.raises(NotFound):
        await client.call("GetVersion", pb.GetVersionRequest(ref=pb.VersionRef(model="gone")))
