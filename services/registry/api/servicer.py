"""``maas.registry.v1.RegistryService``: each RPC converts, awaits the core, converts back.

The tenant comes from the authenticated principal (``current_principal``, set by the auth interceptor),
never from a request field; the servicer hands it to the core explicitly, which never reads credentials.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from maas.registry.v1 import registry_pb2 as pb
from maas.registry.v1 import registry_pb2_grpc

from services.registry.api import convert
from services.registry.core.service import RegistryCore
from shared.errors import InvalidArgument
from shared.security.access import (
    Access,
    caller_owner,
    caller_scope,
    current_principal,
    rules,
)
from shared.security.keys import GRANT_PROTECTED_ALIASES
from shared.streams import idle_timeout

_UPDATABLE = {"description", "tags"}


# Who may call what (shared.security.access); the tenant of each resource is checked in the core.
AUTHORIZATION = rules(
    pb.DESCRIPTOR.services_by_name["RegistryService"],
    {
        "CreateModel": Access.DEVELOPER,
        "GetModel": Access.DEVELOPER,
        "ListModels": Access.DEVELOPER,
        "UpdateModel": Access.DEVELOPER,
        "DeleteModel": Access.DEVELOPER,
        "UploadVersion": Access.DEVELOPER,
        "GetVersion": Access.DEVELOPER,
        "ListVersions": Access.DEVELOPER,
        "DownloadVersion": Access.DEVELOPER,
        "DeriveVersion": Access.DEVELOPER,
        "SetAlias": Access.DEVELOPER,
        "DeleteAlias": Access.DEVELOPER,
        "ListAliases": Access.DEVELOPER,
        "WatchEvents": Access.DEVELOPER,
        "SignVersion": Access.DEVELOPER,
        "GetTrustPolicy": Access.DEVELOPER,
        # What a tenant's deployments trust is an administrator's call, as protected aliases are.
        "AddTrustedKey": Access.ADMIN,
        "RemoveTrustedKey": Access.ADMIN,
    },
)


def _may_move_protected() -> bool:
    """Admin keys, the mesh's services and keys granted ``protected-aliases`` (within their own tenant: the
    tenant scope still applies); everyone in development mode (no principal)."""
    principal = current_principal.get()
    return principal is None or principal.is_admin or GRANT_PROTECTED_ALIASES in principal.grants


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self, core: RegistryCore, *, upload_idle_timeout_s: float = 60.0) -> None:
        self._core = core
        self._upload_idle_timeout_s = upload_idle_timeout_s

    async def CreateModel(
        self, request: pb.CreateModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateModelResponse:
        model = await self._core.create_model(
            request.name, request.description, dict(request.tags), owner=caller_owner()
        )
        return pb.CreateModelResponse(model=convert.model_to_pb(model))

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.GetModelResponse:
        model = await self._core.get_model(request.name, tenant=caller_scope())
        return pb.GetModelResponse(model=convert.model_to_pb(model))

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        page = await self._core.list_models(
            request.page_size, request.page_token, request.name_prefix, dict(request.tags), tenant=caller_scope()
        )
        return pb.ListModelsResponse(
            models=[convert.model_to_pb(m) for m in page.items], next_page_token=page.next_page_token
        )

    async def UpdateModel(
        self, request: pb.UpdateModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateModelResponse:
        mask = set(request.update_mask)
        if not mask:
            raise InvalidArgument.field("update_mask", "name at least one of: description, tags")
        if unknown := mask - _UPDATABLE:
            raise InvalidArgument.field("update_mask", f"cannot update {', '.join(sorted(unknown))}")
        model = await self._core.update_model(
            request.name,
            request.description if "description" in mask else None,
            dict(request.tags) if "tags" in mask else None,
            tenant=caller_scope(),
        )
        return pb.UpdateModelResponse(model=convert.model_to_pb(model))

    async def DeleteModel(
        self, request: pb.DeleteModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteModelResponse:
        await self._core.delete_model(
            request.name, request.force, tenant=caller_scope(), may_move_protected=_may_move_protected()
        )
        return pb.DeleteModelResponse()

    async def UploadVersion(
        self, request_iterator: AsyncIterator[pb.UploadVersionRequest], context: grpc.aio.ServicerContext
    ) -> pb.UploadVersionResponse:
        # A client that stops sending holds a temp file and a stream slot: the upload ends after a quiet spell.
        messages = aiter(idle_timeout(request_iterator, self._upload_idle_timeout_s, "the upload"))
        first = await anext(messages, None)
        if first is None or not first.HasField("metadata"):
            raise InvalidArgument.field("metadata", "the first message of an upload must carry the metadata")

        async def chunks() -> AsyncIterator[bytes]:
            async for message in messages:
                if message.WhichOneof("payload") != "chunk":
                    raise InvalidArgument.field("metadata", "only the first message may carry metadata")
                yield message.chunk

        version = await self._core.upload_version(
            convert.upload_from_pb(first.metadata), chunks(), tenant=caller_scope(), owner=caller_owner()
        )
        return pb.UploadVersionResponse(version=convert.version_to_pb(version))

    async def GetVersion(
        self, request: pb.GetVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetVersionResponse:
        version = await self._core.get_version(request.ref.model, request.ref.version, tenant=caller_scope())
        return pb.GetVersionResponse(version=convert.version_to_pb(version))

    async def ListVersions(
        self, request: pb.ListVersionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListVersionsResponse:
        page = await self._core.list_versions(
            request.model, request.page_size, request.page_token, tenant=caller_scope()
        )
        return pb.ListVersionsResponse(
            versions=[convert.version_to_pb(v) for v in page.items], next_page_token=page.next_page_token
        )

    async def DownloadVersion(
        self, request: pb.DownloadVersionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DownloadVersionResponse]:
        version, chunks = await self._core.download(
            request.ref.model, request.ref.version, request.offset, request.chunk_size, tenant=caller_scope()
        )
        yield pb.DownloadVersionResponse(version=convert.version_to_pb(version), offset=request.offset)
        offset = request.offset
        async for chunk in chunks:
            yield pb.DownloadVersionResponse(offset=offset, chunk=chunk)
            offset += len(chunk)

    async def DeriveVersion(
        self, request: pb.DeriveVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeriveVersionResponse:
        version = await self._core.derive_version(
            request.ref.model, request.ref.version, request.variant, dict(request.tags), tenant=caller_scope()
        )
        return pb.DeriveVersionResponse(version=convert.version_to_pb(version))

    async def SetAlias(self, request: pb.SetAliasRequest, context: grpc.aio.ServicerContext) -> pb.SetAliasResponse:
        alias = await self._core.set_alias(
            request.model,
            request.alias,
            request.version,
            request.create_only,
            tenant=caller_scope(),
            may_move_protected=_may_move_protected(),
        )
        return pb.SetAliasResponse(alias=convert.alias_to_pb(alias))

    async def DeleteAlias(
        self, request: pb.DeleteAliasRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteAliasResponse:
        await self._core.delete_alias(
            request.model, request.alias, tenant=caller_scope(), may_move_protected=_may_move_protected()
        )
        return pb.DeleteAliasResponse()

    async def ListAliases(
        self, request: pb.ListAliasesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAliasesResponse:
        aliases = await self._core.list_aliases(request.model, tenant=caller_scope())
        return pb.ListAliasesResponse(aliases=[convert.alias_to_pb(a) for a in aliases])

    async def SignVersion(
        self, request: pb.SignVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.SignVersionResponse:
        version = await self._core.sign_version(
            request.ref.model,
            request.ref.version,
            request.signature,
            request.public_key_pem.encode(),
            tenant=caller_scope(),
        )
        return pb.SignVersionResponse(version=convert.version_to_pb(version))

    async def GetTrustPolicy(
        self, request: pb.GetTrustPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetTrustPolicyResponse:
        if request.model:
            tenant = await self._core.model_tenant(request.model, tenant=caller_scope())
        else:
            tenant = caller_owner()
        keys = await self._core.trust_policy(tenant)
        return pb.GetTrustPolicyResponse(tenant=tenant, keys=[convert.trusted_key_to_pb(k) for k in keys])

    async def AddTrustedKey(
        self, request: pb.AddTrustedKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.AddTrustedKeyResponse:
        key = await self._core.add_trusted_key(request.name, request.public_key_pem.encode(), owner=caller_owner())
        return pb.AddTrustedKeyResponse(key=convert.trusted_key_to_pb(key))

    async def RemoveTrustedKey(
        self, request: pb.RemoveTrustedKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.RemoveTrustedKeyResponse:
        await self._core.remove_trusted_key(request.name, owner=caller_owner())
        return pb.RemoveTrustedKeyResponse()

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchEventsResponse]:
        async for event in self._core.watch(request.after_sequence, list(request.models), tenant=caller_scope()):
            yield pb.WatchEventsResponse(event=convert.event_to_pb(event))
