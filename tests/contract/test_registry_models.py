"""Registry models through the public gRPC API, on SQLite and PostgreSQL."""

from __future__ import annotations

import grpc
import pytest
from maas.registry.v1 import registry_pb2 as pb

from shared.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from tests.support.artifacts import as_stream, tiny_artifact, upload_messages

BAD_NAMES = ["../x", "a/b", "", "x" * 300, "modèle", "UPPER", "-lead", ".hidden", "a b", "a\x00b"]


async def test_create_get_update_delete(registry_client) -> None:
    created = await registry_client.call(
        "CreateModel", pb.CreateModelRequest(name="iris", description="flowers", tags={"team": "vision"})
    )
    assert created.model.name == "iris" and created.model.latest_version == 0
    assert dict(created.model.tags) == {"team": "vision"}
    got = await registry_client.call("GetModel", pb.GetModelRequest(name="iris"))
    assert got.model.description == "flowers"
    updated = await registry_client.call(
        "UpdateModel",
        pb.UpdateModelRequest(name="iris", update_mask=["description", "tags"], description="d2", tags={"a": "b"}),
    )
    assert updated.model.description == "d2" and dict(updated.model.tags) == {"a": "b"}
    assert updated.model.update_time.ToDatetime() >= created.model.update_time.ToDatetime()
    only_tags = await registry_client.call(
        "UpdateModel", pb.UpdateModelRequest(name="iris", update_mask=["tags"], tags={"c": "d"})
    )
    assert only_tags.model.description == "d2" and dict(only_tags.model.tags) == {"c": "d"}
    await registry_client.call("DeleteModel", pb.DeleteModelRequest(name="iris"))
    with pytest.raises(NotFound, match="iris"):
        await registry_client.call("GetModel", pb.GetModelRequest(name="iris"))


async def test_duplicate_model_is_already_exists(registry_client) -> None:
    await registry_client.call("CreateModel", pb.CreateModelRequest(name="dup"))
    with pytest.raises(AlreadyExists, match="dup"):
        await registry_client.call("CreateModel", pb.CreateModelRequest(name="dup"))


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_bad_names_are_invalid_argument(registry_client, name: str) -> None:
    with pytest.raises(InvalidArgument, match="name") as info:
        await registry_client.call("CreateModel", pb.CreateModelRequest(name=name))
    assert info.value.violations and info.value.violations[0].field == "name"
    with pytest.raises(InvalidArgument):
        await registry_client.call("GetModel", pb.GetModelRequest(name=name))


async def test_bad_tags_and_update_mask(registry_client) -> None:
    with pytest.raises(InvalidArgument, match="tag"):
        await registry_client.call("CreateModel", pb.CreateModelRequest(name="t", tags={"../k": "v"}))
    await registry_client.call("CreateModel", pb.CreateModelRequest(name="t"))
    with pytest.raises(InvalidArgument, match="update_mask"):
        await registry_client.call("UpdateModel", pb.UpdateModelRequest(name="t"))
    with pytest.raises(InvalidArgument, match="name"):
        await registry_client.call("UpdateModel", pb.UpdateModelRequest(name="t", update_mask=["name"]))


async def test_list_pages_filters_and_tokens(registry_client) -> None:
    for i in range(7):
        await registry_client.call(
            "CreateModel", pb.CreateModelRequest(name=f"m{i}", tags={"parity": "even" if i % 2 == 0 else "odd"})
        )
    await registry_client.call("CreateModel", pb.CreateModelRequest(name="other"))
    names, token = [], ""
    while True:
        reply = await registry_client.call(
            "ListModels", pb.ListModelsRequest(page_size=3, page_token=token, name_prefix="m")
        )
        assert len(reply.models) <= 3
        names += [m.name for m in reply.models]
        token = reply.next_page_token
        if not token:
            break
    assert names == [f"m{i}" for i in range(7)]
    even = await registry_client.call("ListModels", pb.ListModelsRequest(tags={"parity": "even"}))
    assert [m.name for m in even.models] == ["m0", "m2", "m4", "m6"]
    with pytest.raises(InvalidArgument, match="page_token"):
        await registry_client.call("ListModels", pb.ListModelsRequest(page_token="not-a-token"))
    first = await registry_client.call("ListModels", pb.ListModelsRequest(page_size=2))
    with pytest.raises(InvalidArgument, match="page_token"):
        # A token is bound to the filter it was issued for.
        await registry_client.call(
            "ListModels", pb.ListModelsRequest(page_size=2, page_token=first.next_page_token, name_prefix="m")
        )
    with pytest.raises(InvalidArgument, match="page_size"):
        await registry_client.call("ListModels", pb.ListModelsRequest(page_size=-1))


async def test_delete_refused_while_aliased_unless_forced(registry_client, tmp_path) -> None:
    path, manifest = tiny_artifact(tmp_path)
    await registry_client.stub.UploadVersion(as_stream(upload_messages("held", path.read_bytes(), manifest)))
    await registry_client.call("SetAlias", pb.SetAliasRequest(model="held", alias="production", version=1))
    with pytest.raises(FailedPrecondition, match="production"):
        await registry_client.call("DeleteModel", pb.DeleteModelRequest(name="held"))
    assert (await registry_client.call("GetModel", pb.GetModelRequest(name="held"))).model.latest_version == 1
    await registry_client.call("DeleteModel", pb.DeleteModelRequest(name="held", force=True))
    with pytest.raises(NotFound):
        await registry_client.call("GetVersion", pb.GetVersionRequest(ref=pb.VersionRef(model="held", version="1")))


async def test_unknown_model_is_not_found_with_status_details(registry, registry_client) -> None:
    # Through the raw stub: the status code, message and google.rpc details clients see.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await registry_client.stub.GetModel(pb.GetModelRequest(name="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in info.value.details()
    assert any(k == "grpc-status-details-bin" for k, _ in info.value.trailing_metadata())
