"""Registry versions, artifacts, aliases and variants through the public gRPC API (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import hashlib
import struct
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import torch
from maas.registry.v1 import registry_pb2 as pb

from shared.artifacts import load_artifact
from shared.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from shared.grpc.status import from_rpc_error
from tests.support.artifacts import as_stream, rewrite_header, sha256, tiny_artifact, upload_messages

sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


async def upload(client, model: str, data: bytes, manifest: str, **kwargs) -> pb.Version:  # type: ignore[no-untyped-def]
    reply = await client.stub.UploadVersion(as_stream(upload_messages(model, data, manifest, **kwargs)))
    return reply.version


async def expect_upload_error(client, messages, code: grpc.StatusCode, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.stub.UploadVersion(as_stream(messages))
    assert info.value.code() == code, info.value.details()
    assert match in info.value.details()


def blobs(registry) -> list:  # type: ignore[no-untyped-def]
    root = registry.core._store.root  # the store's directory: what the tests check stays clean
    return sorted(p for p in root.rglob("*") if p.is_file())


async def test_upload_download_round_trip(registry, registry_client, tmp_path) -> None:
    path, manifest = tiny_artifact(tmp_path)
    data = path.read_bytes()
    version = await upload(registry_client, "tiny", data, manifest, chunk=100, tags={"stage": "test"})
    assert (version.number, version.sha256, version.size_bytes) == (1, sha256(data), len(data))
    assert version.architecture == "mlp" and version.dtype == "float32"
    assert [s.name for s in version.signature.inputs] == ["input"]
    assert list(version.signature.inputs[0].shape) == [-1, 4]
    dest = tmp_path / "out.safetensors"
    got = await registry_client.download_file(pb.VersionRef(model="tiny", version="1"), dest)
    assert dest.read_bytes() == data and got.sha256 == sha256(data)
    # Resumable: from a byte offset the rest arrives, with the digest up front.
    chunks: list[bytes] = []
    half = len(data) // 2
    async for message in registry_client.stub.DownloadVersion(
        pb.DownloadVersionRequest(ref=pb.VersionRef(model="tiny"), offset=half, chunk_size=100)
    ):
        if message.HasField("version"):
            assert message.version.sha256 == sha256(data)
        else:
            assert message.offset == half + sum(len(c) for c in chunks)
            chunks.append(message.chunk)
    assert b"".join(chunks) == data[half:] and len(chunks) > 1
    model = load_artifact(dest)
    x = torch.randn(2, 4)
    assert model(x).shape == (2, 3)


async def test_client_resumes_a_partial_download(registry_client, tmp_path) -> None:
    path, manifest = tiny_artifact(tmp_path)
    data = path.read_bytes()
    await upload(registry_client, "resume", data, manifest)
    dest = tmp_path / "resumed.safetensors"
    (tmp_path / "resumed.safetensors.part").write_bytes(data[:500])
    assert len(data) > 500
    seen = []
    await registry_client.download_file(pb.VersionRef(model="resume"), dest, progress=seen.append)
    assert dest.read_bytes() == data and sum(seen) == len(data) - 500


async def test_identical_bytes_are_stored_once(registry, registry_client, tmp_path) -> None:
    path, manifest = tiny_artifact(tmp_path)
    await upload(registry_client, "a", path.read_bytes(), manifest)
    await upload(registry_client, "b", path.read_bytes(), manifest)
    assert len(blobs(registry)) == 1
    await registry_client.call("DeleteModel", pb.DeleteModelRequest(name="a"))
    assert len(blobs(registry)) == 1  # still referenced by b
    await registry_client.call("DeleteModel", pb.DeleteModelRequest(name="b"))
    assert blobs(registry) == []


async def test_sixteen_parallel_uploads_number_1_to_16(registry_client, tmp_path) -> None:
    artifacts = [tiny_artifact(tmp_path, seed=i) for i in range(16)]
    await registry_client.call("CreateModel", pb.CreateModelRequest(name="busy"))
    versions = await asyncio.gather(
        *(upload(registry_client, "busy", p.read_bytes(), m, create_model=False, chunk=512) for p, m in artifacts)
    )
    assert sorted(v.number for v in versions) == list(range(1, 17))
    by_number = {v.number: v.sha256 for v in versions}
    listed = await registry_client.call("ListVersions", pb.ListVersionsRequest(model="busy", page_size=100))
    assert [v.number for v in listed.versions] == list(range(1, 17))
    assert {v.number: v.sha256 for v in listed.versions} == by_number


async def test_digest_and_size_mismatches(registry, registry_client, tmp_path) -> None:
    path, manifest = tiny_artifact(tmp_path)
    data = path.read_bytes()
    bad_sha = hashlib.sha256(b"other").hexdigest()
    await expect_upload_error(
        registry_client,
        upload_messages("m", data, manifest, declared_sha=bad_sha),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sha256",
    )
    await expect_upload_error(
        registry_client,
        upload_messages("m", data, manifest, declared_size=len(data) + 10),
        grpc.StatusCode.INVALID_ARGUMENT,
        "declared",
    )
    await expect_upload_error(
        registry_client,
        upload_messages("m", data, manifest, declared_size=len(data) - 10),
        grpc.StatusCode.INVALID_ARGUMENT,
        "more than the declared",
    )
    await expect_upload_error(
        registry_client,
        upload_messages("m", data, manifest, declared_sha="XYZ"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sha256",
    )
    assert blobs(registry) == []
    with pytest.raises(NotFound):
        await registry_client.call("GetModel", pb.GetModelRequest(name="m"))


async def test_oversize_upload_is_refused_before_any_byte(registry, registry_client, tmp_path) -> None:
    path, manifest = tiny_artifact(tmp_path)
    data = path.read_bytes()
    limit = 64 * 1024 * 1024
    await expect_upload_error(
        registry_client,
        upload_messages("big", data, manifest, declared_size=limit + 1),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "limit",
    )
    assert blobs(registry) == []


async def test_chunk_over_4_mib_is_invalid(registry_client, tmp_path) -> None:
    path, manifest = tiny_artifact(tmp_path)
    data = path.read_bytes()
    big = data + b"\0" * (5 * 1024 * 1024)
    messages = upload_messages("m", big, manifest, chunk=len(big))
    await expect_upload_error(registry_client, messages, grpc.StatusCode.INVALID_ARGUMENT, "at most")


@pytest.mark.parametrize(
    ("manifest", "match"),
    [
        ("{not json", "JSON"),
        (
            '{"architecture": "resnet-9000", "arguments": {}, "format_version": 1,'
            ' "signature": {"inputs": [], "outputs": []}}',
            "resnet-9000",
        ),
        ("[]", "manifest"),
    ],
)
async def test_bad_manifests(registry_client, tmp_path, manifest: str, match: str) -> None:
    path, _ = tiny_artifact(tmp_path)
    await expect_upload_error(
        registry_client,
        upload_messages("m", path.read_bytes(), manifest),
        grpc.StatusCode.INVALID_ARGUMENT,
        match,
    )


async def test_lying_safetensors_headers(registry, registry_client, tmp_path) -> None:
    path, manifest = tiny_artifact(tmp_path)
    data = path.read_bytes()

    def shift(header: dict) -> None:
        name = next(k for k in header if k != "__metadata__")
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [begin, end + 4]

    def wrong_shape(header: dict) -> None:
        header["0.weight" if "0.weight" in header else next(k for k in header if k != "__metadata__")]["shape"] = [
            1,
            1,
        ]

    for edit in (shift, wrong_shape):
        lying = rewrite_header(data, edit)
        await expect_upload_error(
            registry_client, upload_messages("m", lying, manifest), grpc.StatusCode.INVALID_ARGUMENT, "artifact"
        )
    # A header length that runs past the end of the file.
    truncated = (10**6).to_bytes(8, "little") + data[8:200]
    await expect_upload_error(
        registry_client, upload_messages("m", truncated, manifest), grpc.StatusCode.INVALID_ARGUMENT, "artifact"
    )
    # Weights of another architecture than the manifest names.
    other, _ = tiny_artifact(tmp_path, arguments={"in_features": 5, "hidden": [8], "out_features": 3}, name="o")
    await expect_upload_error(
        registry_client,
        upload_messages("m", other.read_bytes(), manifest),
        grpc.StatusCode.INVALID_ARGUMENT,
        "artifact",
    )
    assert blobs(registry) == []


async def test_first_message_must_be_metadata(registry_client) -> None:
    await expect_upload_error(
        registry_client, [pb.UploadVersionRequest(chunk=b"abc")], grpc.StatusCode.INVALID_ARGUMENT, "metadata"
    )
    await expect_upload_error(registry_client, [], grpc.StatusCode.INVALID_ARGUMENT, "metadata")


async def test_upload_to_missing_model_without_create(registry_client, tmp_path) -> None:
    path, manifest = tiny_artifact(tmp_path)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await upload(registry_client, "ghost", path.read_bytes(), manifest, create_model=False)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_cancelled_upload_leaves_nothing(registry, registry_client, tmp_path) -> None:
    path, manifest = tiny_artifact(tmp_path, arguments={"in_features": 256, "hidden": [1024, 1024], "out_features": 10})
    data = path.read_bytes()
    messages = upload_messages("cancel", data, manifest, chunk=64 * 1024)
    sent = asyncio.Event()

    async def slow():  # type: ignore[no-untyped-def]
        for i, message in enumerate(messages):
            yield message
            if i == len(messages) // 2:
                sent.set()
                await asyncio.sleep(30)

    # Through the project's channel (with its tracing interceptor): cancelling must reach the server.
    call = registry_client.stub.UploadVersion(slow())
    await asyncio.wait_for(sent.wait(), 10)
    await asyncio.sleep(0.3)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    for _ in range(50):
        if not blobs(registry):
            break
        await asyncio.sleep(0.1)
    assert blobs(registry) == []
    with pytest.raises(NotFound):
        await registry_client.call("GetVersion", pb.GetVersionRequest(ref=pb.VersionRef(model="cancel")))


async def test_aliases_resolve_move_and_delete(registry_client, tmp_path) -> None:
    for seed in range(3):
        path, manifest = tiny_artifact(tmp_path, seed=seed)
        await upload(registry_client, "ranker", path.read_bytes(), manifest)
    await registry_client.call("SetAlias", pb.SetAliasRequest(model="ranker", alias="production", version=1))
    await registry_client.call("SetAlias", pb.SetAliasRequest(model="ranker", alias="staging", version=3))

    async def resolve(ref: str) -> int:
        reply = await registry_client.call(
            "GetVersion", pb.GetVersionRequest(ref=pb.VersionRef(model="ranker", version=ref))
        )
        return reply.version.number

    assert [await resolve(r) for r in ("production", "staging", "", "latest", "2")] == [1, 3, 3, 3, 2]
    # Digits of other scripts, superscripts and numbers beyond int64 are no version numbers: a precise
    # answer each, never INTERNAL.
    for ref, error in (("²", NotFound), ("\u0661", NotFound), ("9" * 19, InvalidArgument), ("9" * 40, InvalidArgument)):
        with pytest.raises(error):
            await resolve(ref)
    await registry_client.call("SetAlias", pb.SetAliasRequest(model="ranker", alias="production", version=2))
    assert await resolve("production") == 2
    model = (await registry_client.call("GetModel", pb.GetModelRequest(name="ranker"))).model
    assert dict(model.aliases) == {"production": 2, "staging": 3}
    v2 = await registry_client.call("GetVersion", pb.GetVersionRequest(ref=pb.VersionRef(model="ranker", version="2")))
    assert list(v2.version.aliases) == ["production"]
    with pytest.raises(AlreadyExists, match="production"):
        await registry_client.call(
            "SetAlias", pb.SetAliasRequest(model="ranker", alias="production", version=3, create_only=True)
        )
    # Downloads accept aliases too.
    dest = tmp_path / "prod.safetensors"
    got = await registry_client.download_file(pb.VersionRef(model="ranker", version="production"), dest)
    assert got.number == 2
    await registry_client.call("DeleteAlias", pb.DeleteAliasRequest(model="ranker", alias="production"))
    with pytest.raises(NotFound, match="production"):
        await resolve("production")
    with pytest.raises(NotFound, match="version 9"):
        await resolve("9")
    with pytest.raises(NotFound):
        await registry_client.call("SetAlias", pb.SetAliasRequest(model="ranker", alias="x", version=9))
    with pytest.raises(InvalidArgument, match="alias"):
        await registry_client.call("SetAlias", pb.SetAliasRequest(model="ranker", alias="latest", version=1))
    with pytest.raises(InvalidArgument, match="alias"):
        await registry_client.call("SetAlias", pb.SetAliasRequest(model="ranker", alias="../p", version=1))
    with pytest.raises(NotFound):
        await registry_client.call("DeleteAlias", pb.DeleteAliasRequest(model="ranker", alias="never"))
    listed = await registry_client.call("ListAliases", pb.ListAliasesRequest(model="ranker"))
    assert [(a.name, a.version) for a in listed.aliases] == [("staging", 3)]


@pytest.mark.parametrize("variant", ["fp16", "bf16", "int8"])
async def test_derived_variants(registry_client, tmp_path, variant: str) -> None:
    arguments = {"in_features": 64, "hidden": [128, 128], "out_features": 10}
    path, manifest = tiny_artifact(tmp_path, arguments=arguments)
    parent = await upload(registry_client, "compress", path.read_bytes(), manifest)
    reply = await registry_client.call(
        "DeriveVersion", pb.DeriveVersionRequest(ref=pb.VersionRef(model="compress", version="1"), variant=variant)
    )
    child = reply.version
    assert child.number == 2 and child.lineage.parent_version == 1 and child.lineage.derivation == variant
    assert child.lineage.size_ratio == pytest.approx(child.size_bytes / parent.size_bytes)
    assert child.lineage.size_ratio < (0.6 if variant != "int8" else 0.4)
    base = load_artifact(path)
    dest = tmp_path / f"{variant}.safetensors"
    await registry_client.download_file(pb.VersionRef(model="compress", version="2"), dest)
    derived = load_artifact(dest)
    x = torch.randn(16, 64)
    with torch.inference_mode():
        dtype = next(derived.parameters()).dtype
        expected, got = base(x), derived(x.to(dtype)).float()
    assert torch.allclose(expected, got, atol=0.05, rtol=0.05)
    with pytest.raises(FailedPrecondition):
        await registry_client.call(
            "DeriveVersion", pb.DeriveVersionRequest(ref=pb.VersionRef(model="compress", version="2"), variant="fp16")
        )
    with pytest.raises(InvalidArgument, match="variant"):
        await registry_client.call(
            "DeriveVersion", pb.DeriveVersionRequest(ref=pb.VersionRef(model="compress", version="1"), variant="int4")
        )


async def test_watch_streams_changes(registry_client, tmp_path) -> None:
    path, manifest = tiny_artifact(tmp_path)
    received: list[pb.RegistryEvent] = []
    call = registry_client.stub.WatchEvents(pb.WatchEventsRequest())

    async def consume() -> None:
        async for message in call:
            received.append(message.event)
            if len(received) == 4:
                return

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0.3)
    await upload(registry_client, "watched", path.read_bytes(), manifest)
    await registry_client.call("SetAlias", pb.SetAliasRequest(model="watched", alias="production", version=1))
    await registry_client.call("DeleteModel", pb.DeleteModelRequest(name="watched", force=True))
    await asyncio.wait_for(consumer, 10)
    call.cancel()
    Type = pb.RegistryEvent.Type
    assert [(e.type, e.model) for e in received] == [
        (Type.MODEL_CREATED, "watched"),
        (Type.VERSION_CREATED, "watched"),
        (Type.ALIAS_SET, "watched"),
        (Type.MODEL_DELETED, "watched"),
    ]
    assert received[1].version == 1 and received[2].alias == "production"
    sequences = [e.sequence for e in received]
    assert sequences == sorted(sequences)
    # Resuming from a sequence replays what came after it.
    replay = registry_client.stub.WatchEvents(pb.WatchEventsRequest(after_sequence=sequences[1], models=["watched"]))
    replayed = []
    async for message in replay:
        replayed.append(message.event.type)
        if len(replayed) == 2:
            break
    replay.cancel()
    assert replayed == [Type.ALIAS_SET, Type.MODEL_DELETED]


@sqlite_only
async def test_watchers_are_capped_and_share_one_feed_poll(registry_settings, tmp_path) -> None:
    # Two registries on one database (replicas): a watcher on one sees what the other writes through the
    # feed poller, which queries once per interval for all its watchers, not once per watcher.
    from services.registry.main import start
    from shared.clients.registry import RegistryClient

    settings = registry_settings.model_copy(update={"registry_watch_poll_s": 0.2, "registry_max_watchers": 2})
    first, second = await start(settings), await start(settings)
    watching = RegistryClient.connect(f"127.0.0.1:{first.port}", settings)
    writing = RegistryClient.connect(f"127.0.0.1:{second.port}", settings)
    feed_reads = 0
    events_after = first.core._repo.events_after

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal feed_reads
        feed_reads += 1
        return events_after(*args, **kwargs)

    first.core._repo.events_after = counting  # type: ignore[method-assign]
    try:
        calls = [watching.stub.WatchEvents(pb.WatchEventsRequest()) for _ in range(2)]
        received: list[str] = []

        async def consume(call: Any) -> None:
            async for message in call:
                received.append(message.event.model)
                return

        consumers = [asyncio.create_task(consume(c)) for c in calls]
        await asyncio.sleep(0.3)
        with pytest.raises(ResourceExhausted, match="2 event watchers"):
            third = watching.stub.WatchEvents(pb.WatchEventsRequest())
            try:
                async for _ in third:
                    break
            except grpc.aio.AioRpcError as exc:
                raise from_rpc_error(exc) from None
        idle_reads = feed_reads
        await asyncio.sleep(1.0)  # five poll intervals: the watchers themselves do not query
        assert feed_reads == idle_reads
        await writing.call("CreateModel", pb.CreateModelRequest(name="from-the-other-replica"))
        await asyncio.wait_for(asyncio.gather(*consumers), 10)
        assert received == ["from-the-other-replica"] * 2
        # More names than one SQL statement may bind: refused, not an INTERNAL error from the database.
        many = watching.stub.WatchEvents(pb.WatchEventsRequest(models=[f"m{i}" for i in range(40_000)]))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in many:
                break
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await watching.close()
        await writing.close()
        await first.server.stop(0.2)
        await second.server.stop(0.2)


async def test_a_wrong_artifact_is_refused_as_soon_as_its_header_arrives(registry, registry_client, tmp_path) -> None:
    _, manifest = tiny_artifact(tmp_path)
    other, _ = tiny_artifact(tmp_path, arguments={"in_features": 5, "hidden": [8], "out_features": 3}, name="o")
    data = other.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    messages = upload_messages("early", data, manifest, chunk=8 + length + 4)
    never = asyncio.Event()

    async def stalled() -> AsyncIterator[pb.UploadVersionRequest]:
        yield messages[0]  # metadata
        yield messages[1]  # the header and a few bytes of weights
        await never.wait()  # the rest never comes: the answer must not wait for it

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await registry_client.stub.UploadVersion(stalled(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "artifact" in (refused.value.details() or "")
    assert blobs(registry) == []


async def test_an_upload_that_would_fill_the_disk_is_refused_first(registry, registry_client, tmp_path) -> None:
    path, manifest = tiny_artifact(tmp_path)
    registry.core._store.free_bytes = lambda: 1024  # a nearly full disk
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await upload(registry_client, "full", path.read_bytes(), manifest)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "free space" in (refused.value.details() or "")


@sqlite_only
async def test_an_upload_that_goes_quiet_is_ended_and_discarded(registry_settings, tmp_path) -> None:
    from services.registry.main import start
    from shared.clients.registry import RegistryClient

    running = await start(registry_settings.model_copy(update={"registry_upload_idle_timeout_s": 0.5}))
    client = RegistryClient.connect(f"127.0.0.1:{running.port}", registry_settings)
    try:
        _, manifest = tiny_artifact(tmp_path)
        path, _ = tiny_artifact(tmp_path)
        messages = upload_messages("quiet", path.read_bytes(), manifest, chunk=64)
        never = asyncio.Event()

        async def stalls() -> AsyncIterator[pb.UploadVersionRequest]:
            yield messages[0]
            yield messages[1]
            await never.wait()

        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await client.stub.UploadVersion(stalls(), timeout=10)
        assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "sent nothing for 0.5 s" in (ended.value.details() or "")
        assert blobs(running) == []
    finally:
        await client.close()
        await running.server.stop(0.2)
