"""Rank 0's trained model becomes a registry version with its lineage, in the job's tenant."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from maas.registry.v1 import registry_pb2 as pb
from torch import nn

from shared.artifacts import Manifest, save_artifact
from shared.clients.registry import RegistryClient
from shared.security.access import TENANT_METADATA


class RegistrySink:
    """Uploads a model as a new version of ``model_name`` (created when missing).

    ``tenant`` is the job's: the rank calls with the mesh's internal token, which sees every tenant, so it
    says which tenant it acts for (``maas-tenant``) and the model (and version) belong to that tenant.
    None: no tenant is named (a scheduler older than tenants).
    """

    def __init__(
        self,
        client: RegistryClient,
        model_name: str,
        lineage: pb.Lineage,
        tags: dict[str, str],
        *,
        tenant: str | None = None,
    ) -> None:
        self._client = client
        self._model = model_name
        self._lineage = lineage
        self._tags = tags
        self._metadata = ((TENANT_METADATA, tenant),) if tenant else None

    async def __call__(self, model: nn.Module, manifest: Manifest, metrics: dict[str, float]) -> int:
        lineage = pb.Lineage()
        lineage.CopyFrom(self._lineage)
        lineage.metrics.update(metrics)
        with tempfile.TemporaryDirectory(prefix="maas-train-") as tmp:
            path = Path(tmp) / "model.safetensors"
            await asyncio.to_thread(save_artifact, model.to("cpu"), manifest, path)
            version = await self._client.upload_file(
                self._model,
                path,
                manifest.to_json(),
                tags=self._tags,
                lineage=lineage,
                create_model=True,
                metadata=self._metadata,
            )
        return int(version.number)
