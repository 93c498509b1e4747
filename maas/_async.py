"""``maas.AsyncClient``: the SDK for asyncio code (``maas.Client`` wraps it for everything else)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any

import numpy as np
from inference import grpc_service_pb2 as kpb
from inference import grpc_service_pb2_grpc
from maas._deployments import AsyncDeployments
from maas._jobs import AsyncJobs
from maas._models import AsyncModels
from maas._rpc import Connection
from maas._serving import Serving
from maas._settings import ClientSettings, Credentials, resolve_settings
from maas._tenants import AsyncTenants
from maas.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from shared.clients.registry import RegistryClient
from shared.grpc.calls import RetryPolicy

_SCHEDULER = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"]
_GATEWAY = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"]


class AsyncClient:
    """A client of a maas mesh: the registry, the scheduler and the gateway.

    Settings come from the same places as the CLI's: ``MAAS_*`` variables (``MAAS_REGISTRY_ADDRESS``,
    ``MAAS_CLIENT_TOKEN``, ``MAAS_TLS_CA_FILE``...), the TOML file named by ``MAAS_CONFIG_FILE``, and the
    credentials file ``maas up`` writes under ``MAAS_HOME`` (the API key in a 0600 file, the mesh's CA for TLS).
    Arguments given here win over all of them.

    Args:
        address: The host the mesh runs on; each service keeps its configured port (7001, 7002, 8001).
        credentials: An API key, or :class:`Credentials` (key, CA file, plaintext or not).
        registry_address: host:port of the registry, overriding ``address``.
        scheduler_address: host:port of the scheduler, overriding ``address``.
        gateway_address: host:port of the gateway, overriding ``address``.
        settings: Settings to start from instead of the environment's.
        retry: How calls that are safe to repeat are retried on UNAVAILABLE.

    Channels connect lazily; use ``async with`` (or :meth:`close`) to release them.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        credentials: str | Credentials | None = None,
        registry_address: str | None = None,
        scheduler_address: str | None = None,
        gateway_address: str | None = None,
        settings: ClientSettings | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        overrides = {
            "registry_address": registry_address,
            "scheduler_address": scheduler_address,
            "gateway_address": gateway_address,
        }
        self.settings = resolve_settings(settings, address, credentials, overrides)
        retry = retry or RetryPolicy()
        self._registry = RegistryClient.connect(self.settings.registry_address, self.settings, retry=retry)
        self._scheduler = Connection(
            self.settings.scheduler_address, self.settings, _SCHEDULER, scheduler_pb2_grpc.SchedulerServiceStub, retry
        )
        self._gateway = Connection(
            self.settings.gateway_address,
            self.settings,
            _GATEWAY,
            grpc_service_pb2_grpc.GRPCInferenceServiceStub,
            retry,
        )
        self._serving = Serving(self._gateway)
        self.models = AsyncModels(self._registry)
        """Models and versions in the registry."""
        self.jobs = AsyncJobs(self._scheduler)
        """Training jobs in the scheduler."""
        self.deployments = AsyncDeployments(self._scheduler)
        """Inference deployments in the scheduler."""
        self.tenants = AsyncTenants(self._scheduler)
        """Tenants' quotas in the scheduler."""

    async def infer(self, model: str, inputs: Mapping[str, Any] | Any, *, version: str = "") -> dict[str, np.ndarray]:
        """Run one inference through the gateway.

        Args:
            model: The deployment's name.
            inputs: Arrays by input name, or one array for a model with a single input; numpy arrays, torch
                tensors, or anything ``np.asarray`` takes. Each is cast to the datatype the model declares.
            version: A version number or alias (default: the deployment's).

        Returns:
            The outputs by name as numpy arrays.
        """
        return await self._serving.infer(model, inputs, version)

    async def infer_response(
        self, model: str, inputs: Mapping[str, Any] | Any, *, version: str = ""
    ) -> kpb.ModelInferResponse:
        """As :meth:`infer`, but the KServe response itself (which version answered, its parameters);
        ``maas.tensors.decode_outputs`` turns it into arrays."""
        return await self._serving.infer_response(model, inputs, version)

    def generate(self, model: str, prompt: str, *, max_tokens: int = 64, version: str = "") -> AsyncIterator[str]:
        """Stream a continuation of ``prompt`` from a deployed byte-level language model, as text pieces."""
        return self._serving.generate(model, prompt, max_tokens=max_tokens, version=version)

    async def model_metadata(self, model: str, *, version: str = "") -> kpb.ModelMetadataResponse:
        """A deployed model's inputs and outputs as the gateway describes them."""
        return await self._serving.metadata(model, version)

    async def model_ready(self, model: str, *, version: str = "", timeout: float | None = None) -> bool:
        """Whether the gateway can serve ``model`` now."""
        return await self._serving.ready(model, version, timeout=timeout)

    async def close(self) -> None:
        """Close the channels."""
        await self._registry.close()
        await self._scheduler.close()
        await self._gateway.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
