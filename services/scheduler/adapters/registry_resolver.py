"""The deployment core's ModelResolver on the registry's ``GetVersion``, acting for the deployment's tenant
(``maas-tenant`` metadata beside the mesh's internal token)."""

from __future__ import annotations

import asyncio

from maas.registry.v1 import registry_pb2 as rpb

from services.scheduler.core.deployments.model import ResolvedVersion
from shared.artifacts import trust
from shared.clients.registry import RegistryClient
from shared.kserve.convert import signature_from_pb
from shared.security.access import TENANT_METADATA
from shared.settings import CommonSettings


class RegistryModelResolver:
    """Implements ``core.deployment_ports.ModelResolver``; NotFound comes from the registry as it is."""

    def __init__(self, client: RegistryClient) -> None:
        self._client = client

    @classmethod
    def connect(cls, target: str, settings: CommonSettings) -> RegistryModelResolver:
        return cls(RegistryClient.connect(target, settings))

    async def resolve(self, model: str, version: str, tenant: str) -> ResolvedVersion:
        # As the deployment's tenant sees the registry: another tenant's model is NOT_FOUND there.
        found = await self._client.get_version(
            rpb.VersionRef(model=model, version=version), metadata=((TENANT_METADATA, tenant),)
        )
        return ResolvedVersion(
            version=found.number,
            architecture=found.architecture,
            signature=signature_from_pb(found.signature),
            aliases=tuple(sorted(found.aliases)),
        )

    async def signature_problem(self, model: str, version: int, tenant: str) -> str:
        metadata = ((TENANT_METADATA, tenant),)
        ref = rpb.VersionRef(model=model, version=str(version))
        found = (await self._client.call("GetVersion", rpb.GetVersionRequest(ref=ref), metadata=metadata)).version
        if not found.signatures:
            return "the version is not signed"
        policy = await self._client.call("GetTrustPolicy", rpb.GetTrustPolicyRequest(model=model), metadata=metadata)
        _, problem = await asyncio.to_thread(
            trust.trusted_signers,
            [trust.RecordedSignature(s.key_id, s.bundle) for s in found.signatures],
            [trust.TrustAnchor(k.name, k.key_id, k.public_key_pem.encode()) for k in policy.keys],
            found.sha256,
            policy.tenant,
        )
        return str(problem)

    async def close(self) -> None:
        await self._client.close()
