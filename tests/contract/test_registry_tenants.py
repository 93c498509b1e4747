"""Tenants in the registry, through the public gRPC API of a real registry in secure mode (TLS, API keys).

Every model belongs to the tenant of the key that created it. A developer of another tenant must not be able
to tell that model from a missing one: the tests record every error such a developer gets while the model
exists, delete it, and require the very same errors again. Admin keys and the mesh's services see every
tenant, or one through ``maas-tenant``; protected aliases need an admin or a key granted ``protected-aliases``
(which acts within its own tenant only).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from maas.registry.v1 import registry_pb2 as pb

from services.registry.adapters.sql.tables import MIGRATIONS
from shared.clients.registry import RegistryClient
from shared.errors import MaasError
from shared.security.access import TENANT_METADATA
from shared.security.keys import GRANT_PROTECTED_ALIASES, KeyStore, Role
from shared.security.pki import MESH_NAME, init_pki
from shared.settings import CommonSettings
from shared.sql import create_engine, migrate
from tests.support.artifacts import tiny_artifact
from tests.support.migrations import upgrade_to

INTERNAL_TOKEN = "internal-token-for-the-tenant-tests-0123456789"
A, B = "team-a", "team-b"


@dataclass
class Registry:
    """A secure registry and a client for each caller: ``a``/``b`` (developers of A and B), ``a-admin`` (an
    admin of A), ``a-granted``/``b-granted`` (developers of A and B granted ``protected-aliases``),
    ``internal`` (the mesh's token)."""

    target: str
    ca: Path
    tokens: dict[str, str]
    clients: dict[str, RegistryClient]
    tmp: Path

    def __getitem__(self, who: str) -> RegistryClient:
        if who not in self.clients:
            settings = CommonSettings(
                insecure=False, tls_ca_file=self.ca, tls_server_name=MESH_NAME, client_token=self.tokens[who]
            )
            self.clients[who] = RegistryClient.connect(self.target, settings)
        return self.clients[who]

    async def upload(self, who: str, model: str, *, create_model: bool = False, seed: int = 0) -> pb.Version:
        path, manifest = tiny_artifact(self.tmp, seed=seed)
        return await self[who].upload_file(model, path, manifest, create_model=create_model)


async def _start(tmp: Path, database_url: str, **extra: Any) -> tuple[Any, Registry]:
    from services.registry.main import start
    from services.registry.settings import RegistrySettings

    pki = init_pki(tmp / "tls", ["registry"])
    keys = KeyStore(tmp / "keys.json")
    tokens = {"internal": INTERNAL_TOKEN}
    granted = (GRANT_PROTECTED_ALIASES,)
    for label, tenant, role, grants in (
        ("a", A, Role.DEVELOPER, ()),
        ("b", B, Role.DEVELOPER, ()),
        ("a-admin", A, Role.ADMIN, ()),
        ("a-granted", A, Role.DEVELOPER, granted),
        ("b-granted", B, Role.DEVELOPER, granted),
    ):
        _, tokens[label] = keys.create(tenant, role, f"{label}-key", grants=grants)
    cert = pki.services["registry"]
    settings = RegistrySettings(
        home=tmp / "home",
        insecure=False,
        tls_cert_file=cert.cert,
        tls_key_file=cert.key,
        tls_ca_file=pki.ca.cert,
        tls_require_client_cert=False,  # users hold no mesh certificate
        auth_keys_file=tmp / "keys.json",
        internal_token=INTERNAL_TOKEN,
        rate_limit_management=None,
        registry_address="127.0.0.1:0",
        registry_metrics_address="127.0.0.1:0",
        registry_database_url=database_url,
        registry_watch_poll_s=0.2,
        shutdown_grace_s=0.5,
        **extra,
    )
    running = await start(settings)
    return running, Registry(f"127.0.0.1:{running.port}", pki.ca.cert, tokens, {}, tmp)


@pytest.fixture
async def registry(tmp_path: Path, database_url: str) -> AsyncIterator[Registry]:
    running, reg = await _start(tmp_path, database_url)
    try:
        yield reg
    finally:
        for client in reg.clients.values():
            await client.close()
        await running.server.stop(0.2)


async def _error(call: Awaitable[Any]) -> tuple[str, str, str]:
    """(status, reason, message) of a call that must fail."""
    with pytest.raises(MaasError) as failed:
        await call
    return type(failed.value).__name__, failed.value.reason, failed.value.message


def _meta(tenant: str) -> tuple[tuple[str, str]]:
    return ((TENANT_METADATA, tenant),)


async def _model_names(client: RegistryClient, metadata: Any = None) -> dict[str, str]:
    listed = await client.stub.ListModels(pb.ListModelsRequest(), metadata=metadata)
    return {m.name: m.tenant for m in listed.models}


# Another tenant's model -----------------------------------------------------------------------------------


async def test_another_tenants_model_cannot_be_told_from_a_missing_one(registry: Registry) -> None:
    a, b = registry["a"], registry["b"]
    created = (await a.call("CreateModel", pb.CreateModelRequest(name="m", description="A's", tags={"k": "v"}))).model
    assert created.tenant == A
    await registry.upload("a", "m")
    await a.call("SetAlias", pb.SetAliasRequest(model="m", alias="staging", version=1))
    derived = (
        await a.call("DeriveVersion", pb.DeriveVersionRequest(ref=pb.VersionRef(model="m"), variant="fp16"))
    ).version
    assert (derived.model, derived.number) == ("m", 2)  # the variant stays in A's model
    before = (await a.call("GetModel", pb.GetModelRequest(name="m"))).model

    ref = pb.VersionRef(model="m", version="1")
    attempts: dict[str, Callable[[], Awaitable[Any]]] = {
        "GetModel": lambda: b.call("GetModel", pb.GetModelRequest(name="m")),
        "UpdateModel": lambda: b.call(
            "UpdateModel", pb.UpdateModelRequest(name="m", update_mask=["description"], description="B's")
        ),
        "DeleteModel": lambda: b.call("DeleteModel", pb.DeleteModelRequest(name="m", force=True)),
        "GetVersion": lambda: b.call("GetVersion", pb.GetVersionRequest(ref=ref)),
        "GetVersion@alias": lambda: b.call(
            "GetVersion", pb.GetVersionRequest(ref=pb.VersionRef(model="m", version="staging"))
        ),
        "ListVersions": lambda: b.call("ListVersions", pb.ListVersionsRequest(model="m")),
        "DownloadVersion": lambda: b.download_file(ref, registry.tmp / "stolen.safetensors"),
        "DeriveVersion": lambda: b.call("DeriveVersion", pb.DeriveVersionRequest(ref=ref, variant="bf16")),
        "SetAlias": lambda: b.call("SetAlias", pb.SetAliasRequest(model="m", alias="staging", version=1)),
        "DeleteAlias": lambda: b.call("DeleteAlias", pb.DeleteAliasRequest(model="m", alias="staging")),
        "ListAliases": lambda: b.call("ListAliases", pb.ListAliasesRequest(model="m")),
        "UploadVersion": lambda: registry.upload("b", "m", seed=1),
    }
    while_a_has_it = {name: await _error(attempt()) for name, attempt in attempts.items()}
    assert while_a_has_it["GetModel"] == ("NotFound", "MODEL_NOT_FOUND", "model 'm' not found")
    assert {status for status, _, _ in while_a_has_it.values()} == {"NotFound"}
    assert await _model_names(b) == {}
    listed = await b.call("ListModels", pb.ListModelsRequest(name_prefix="m"))
    assert list(listed.models) == []

    # The name is global: taken, whoever holds it, and the holder is not named.
    for create in (
        b.call("CreateModel", pb.CreateModelRequest(name="m")),
        registry.upload("b", "m", create_model=True, seed=1),
    ):
        status, reason, message = await _error(create)
        assert (status, reason) == ("AlreadyExists", "MODEL_NAME_TAKEN")
        assert "taken" in message and A not in message

    # A's model is untouched.
    after = (await a.call("GetModel", pb.GetModelRequest(name="m"))).model
    assert after == before
    assert (after.description, dict(after.tags), after.latest_version, dict(after.aliases)) == (
        "A's",
        {"k": "v"},
        2,
        {"staging": 1},
    )
    assert [v.number for v in (await a.call("ListVersions", pb.ListVersionsRequest(model="m"))).versions] == [1, 2]

    # Once the model is really gone, B gets exactly what it got while A held it.
    await a.call("DeleteModel", pb.DeleteModelRequest(name="m", force=True))
    once_missing = {name: await _error(attempt()) for name, attempt in attempts.items()}
    assert once_missing == while_a_has_it


async def test_admins_and_the_mesh_see_every_tenant_or_the_one_they_act_for(registry: Registry) -> None:
    await registry["a"].call("CreateModel", pb.CreateModelRequest(name="a-model"))
    await registry["b"].call("CreateModel", pb.CreateModelRequest(name="b-model"))
    admin, mesh = registry["a-admin"], registry["internal"]

    assert await _model_names(admin) == {"a-model": A, "b-model": B}
    assert await _model_names(mesh) == {"a-model": A, "b-model": B}
    assert await _model_names(mesh, _meta(B)) == {"b-model": B}
    assert await _model_names(admin, _meta(B)) == {"b-model": B}
    # A developer cannot widen its view by naming another tenant.
    assert await _model_names(registry["a"], _meta(B)) == {"a-model": A}

    # Acting for B, the mesh creates B's models (a training job's upload) and sees A's as missing.
    version = await registry["internal"].stub.UploadVersion(
        _upload_messages(registry.tmp, "b-trained"), metadata=_meta(B)
    )
    assert version.version.model == "b-trained"
    got = await registry["b"].call("GetModel", pb.GetModelRequest(name="b-trained"))
    assert got.model.tenant == B
    with pytest.raises(grpc.aio.AioRpcError) as hidden:
        await mesh.stub.GetModel(pb.GetModelRequest(name="a-model"), metadata=_meta(B))
    assert (hidden.value.code(), hidden.value.details()) == (grpc.StatusCode.NOT_FOUND, "model 'a-model' not found")
    # Without a tenant, the mesh's own models belong to the default tenant; an admin's to its own.
    assert (await mesh.call("CreateModel", pb.CreateModelRequest(name="mesh-made"))).model.tenant == "default"
    assert (await admin.call("CreateModel", pb.CreateModelRequest(name="admin-made"))).model.tenant == A


async def _upload_messages(tmp: Path, model: str) -> AsyncIterator[pb.UploadVersionRequest]:
    from tests.support.artifacts import upload_messages

    path, manifest = tiny_artifact(tmp, seed=7)
    for message in upload_messages(model, path.read_bytes(), manifest, create_model=True):
        yield message


async def test_a_tenant_watches_only_its_own_models_events(registry: Registry) -> None:
    a, b = registry["a"], registry["b"]
    # Event 1 of a fresh database: every watch below replays what follows it.
    await a.call("CreateModel", pb.CreateModelRequest(name="a-first"))
    await b.call("CreateModel", pb.CreateModelRequest(name="b-one"))
    await registry.upload("a", "a-first")
    await a.call("SetAlias", pb.SetAliasRequest(model="a-first", alias="staging", version=1))
    await a.call("UpdateModel", pb.UpdateModelRequest(name="a-first", update_mask=["description"], description="x"))
    await registry.upload("b", "b-one", seed=1)
    await a.call("DeleteModel", pb.DeleteModelRequest(name="a-first", force=True))
    await b.call("CreateModel", pb.CreateModelRequest(name="b-last"))

    async def watch(
        client: RegistryClient, models: tuple[str, ...] = (), metadata: Any = None
    ) -> list[tuple[str, str]]:
        seen = []
        request = pb.WatchEventsRequest(after_sequence=1, models=models)
        async for response in client.stub.WatchEvents(request, metadata=metadata):
            event = response.event
            seen.append((event.model, pb.RegistryEvent.Type.Name(event.type)))
            if event.model == "b-last":
                return seen
        raise AssertionError("the watch ended")

    b_events = [("b-one", "MODEL_CREATED"), ("b-one", "VERSION_CREATED"), ("b-last", "MODEL_CREATED")]
    assert await asyncio.wait_for(watch(b), 10) == b_events
    assert await asyncio.wait_for(watch(registry["internal"], metadata=_meta(B)), 10) == b_events
    # Naming A's model does not let B see its events.
    assert await asyncio.wait_for(watch(b, ("a-first", "b-last")), 10) == [("b-last", "MODEL_CREATED")]
    everything = await asyncio.wait_for(watch(registry["a-admin"]), 10)
    assert {model for model, _ in everything} == {"a-first", "b-one", "b-last"}
    assert ("a-first", "MODEL_DELETED") in everything


# Protected aliases --------------------------------------------------------------------------------------


async def test_moving_production_needs_an_admin(registry: Registry) -> None:
    a = registry["a"]
    await registry.upload("a", "m", create_model=True)
    await registry.upload("a", "m", seed=1)

    status, reason, message = await _error(
        a.call("SetAlias", pb.SetAliasRequest(model="m", alias="production", version=1))
    )
    assert (status, reason) == ("PermissionDenied", "PROTECTED_ALIAS")
    assert "'production'" in message and "admin" in message
    # Another tenant's developer is refused the same way (no lookup happens): nothing about the model leaks.
    assert await _error(
        registry["b"].call("SetAlias", pb.SetAliasRequest(model="m", alias="production", version=1))
    ) == (status, reason, message)

    await registry["a-admin"].call("SetAlias", pb.SetAliasRequest(model="m", alias="production", version=1))
    await registry["internal"].call("SetAlias", pb.SetAliasRequest(model="m", alias="production", version=2))
    await a.call("SetAlias", pb.SetAliasRequest(model="m", alias="staging", version=2))
    await a.call("SetAlias", pb.SetAliasRequest(model="m", alias="staging", version=1))
    await a.call("DeleteAlias", pb.DeleteAliasRequest(model="m", alias="staging"))

    # Neither deleting it nor force-deleting the model around it is a developer's to do.
    denied = await _error(a.call("DeleteAlias", pb.DeleteAliasRequest(model="m", alias="production")))
    assert denied[:2] == ("PermissionDenied", "PROTECTED_ALIAS")
    denied = await _error(a.call("DeleteModel", pb.DeleteModelRequest(name="m", force=True)))
    assert denied[:2] == ("PermissionDenied", "PROTECTED_ALIAS")
    model = (await a.call("GetModel", pb.GetModelRequest(name="m"))).model
    assert dict(model.aliases) == {"production": 2}

    await registry["a-admin"].call("DeleteAlias", pb.DeleteAliasRequest(model="m", alias="production"))
    await a.call("DeleteModel", pb.DeleteModelRequest(name="m"))


async def test_a_developer_key_with_the_grant_may_move_production_in_its_own_tenant(registry: Registry) -> None:
    a, granted = registry["a"], registry["a-granted"]
    await registry.upload("a", "m", create_model=True)
    await registry.upload("a", "m", seed=1)

    await granted.call("SetAlias", pb.SetAliasRequest(model="m", alias="production", version=1))
    await granted.call("SetAlias", pb.SetAliasRequest(model="m", alias="production", version=2))
    # The grant is the key's, not the tenant's: A's plain developer key is still refused, and told of the grant.
    status, reason, message = await _error(
        a.call("SetAlias", pb.SetAliasRequest(model="m", alias="production", version=1))
    )
    assert (status, reason) == ("PermissionDenied", "PROTECTED_ALIAS")
    assert f"'{GRANT_PROTECTED_ALIASES}'" in message and "admin" in message
    assert (await a.call("GetModel", pb.GetModelRequest(name="m"))).model.aliases["production"] == 2

    # B's granted developer gains nothing on A's model: it is as missing as a model that does not exist.
    b = registry["b-granted"]
    attempts: dict[str, Callable[[], Awaitable[Any]]] = {
        "SetAlias": lambda: b.call("SetAlias", pb.SetAliasRequest(model="m", alias="production", version=1)),
        "DeleteAlias": lambda: b.call("DeleteAlias", pb.DeleteAliasRequest(model="m", alias="production")),
        "DeleteModel": lambda: b.call("DeleteModel", pb.DeleteModelRequest(name="m", force=True)),
        "GetModel": lambda: b.call("GetModel", pb.GetModelRequest(name="m")),
    }
    while_a_has_it = {name: await _error(attempt()) for name, attempt in attempts.items()}
    assert set(while_a_has_it.values()) == {("NotFound", "MODEL_NOT_FOUND", "model 'm' not found")}
    # B's developer without the grant is refused before any lookup, as before.
    denied = await _error(registry["b"].call("SetAlias", pb.SetAliasRequest(model="m", alias="production", version=1)))
    assert denied[:2] == ("PermissionDenied", "PROTECTED_ALIAS")
    assert (await a.call("GetModel", pb.GetModelRequest(name="m"))).model.aliases["production"] == 2

    # Deleting it, and force-deleting the model around it, are the granted key's to do too.
    await granted.call("DeleteAlias", pb.DeleteAliasRequest(model="m", alias="production"))
    await granted.call("SetAlias", pb.SetAliasRequest(model="m", alias="production", version=1))
    await granted.call("DeleteModel", pb.DeleteModelRequest(name="m", force=True))
    once_missing = {name: await _error(attempt()) for name, attempt in attempts.items()}
    assert once_missing == while_a_has_it


async def test_a_grant_given_or_taken_in_the_key_file_applies_from_the_next_call(registry: Registry) -> None:
    a = registry["a"]
    await registry.upload("a", "m", create_model=True)
    production = pb.SetAliasRequest(model="m", alias="production", version=1)
    denied = await _error(a.call("SetAlias", production))  # the servers now know (and cache) A's key without it
    assert denied[:2] == ("PermissionDenied", "PROTECTED_ALIAS")

    def edit(grants: list[str]) -> None:
        path = registry.tmp / "keys.json"
        data = json.loads(path.read_text())
        for entry in data["keys"]:
            if entry["name"] == "a-key":
                entry["grants"] = grants
        path.write_text(json.dumps(data))

    edit([GRANT_PROTECTED_ALIASES])
    await a.call("SetAlias", production)
    edit([])
    assert (await _error(a.call("SetAlias", production)))[:2] == ("PermissionDenied", "PROTECTED_ALIAS")


async def test_the_protected_aliases_are_configurable(tmp_path: Path) -> None:
    running, registry = await _start(
        tmp_path, f"sqlite:///{tmp_path / 'registry.db'}", registry_protected_aliases=["stable"]
    )
    a = registry["a"]
    try:
        await registry.upload("a", "m", create_model=True)
        await a.call("SetAlias", pb.SetAliasRequest(model="m", alias="production", version=1))
        denied = await _error(a.call("SetAlias", pb.SetAliasRequest(model="m", alias="stable", version=1)))
        assert denied[:2] == ("PermissionDenied", "PROTECTED_ALIAS") and "'stable'" in denied[2]
    finally:
        await a.close()
        await running.server.stop(0.2)


# Migration of existing data -----------------------------------------------------------------------------


def test_models_and_events_from_before_tenants_belong_to_the_default_tenant(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        upgrade_to(engine, MIGRATIONS, "0001")
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "INSERT INTO models (name, description, latest_version, created_at, updated_at) "
                    "VALUES ('old', '', 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                )
            )
            connection.execute(
                sa.text(
                    "INSERT INTO events (type, model, version, alias, created_at) "
                    "VALUES ('MODEL_CREATED', 'old', 0, '', CURRENT_TIMESTAMP)"
                )
            )
        migrate(engine, MIGRATIONS)
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT tenant FROM models")).scalars().all() == ["default"]
            assert connection.execute(sa.text("SELECT tenant FROM events")).scalars().all() == ["default"]
    finally:
        engine.dispose()
