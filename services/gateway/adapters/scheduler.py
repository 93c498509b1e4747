"""The scheduler as the gateway sees it: the endpoint stream, load reports, deployment control."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence

import grpc
import structlog
from maas.scheduler.v1 import scheduler_pb2 as pb
from maas.scheduler.v1 import scheduler_pb2_grpc

from services.gateway.core import model as m
from services.gateway.core.model import Deployment, DeploymentStatus, Endpoint, LoadOptions, ServedVersion
from shared.clients.registry import RegistryClient
from shared.errors import NotFound
from shared.grpc.channel import make_channel
from shared.grpc.status import from_rpc_error
from shared.kserve.convert import batching_from_pb, signature_from_pb
from shared.security.access import (
    TENANT_METADATA,
    caller_scope,
    current_authorization,
    current_principal,
)
from shared.settings import CommonSettings

SERVICE = pb.DESCRIPTOR.services_by_name["SchedulerService"]
log = structlog.get_logger("maas.gateway.scheduler")

_STATES = {
    pb.DEPLOYING: m.DEPLOYING,
    pb.DEPLOYMENT_READY: m.READY,
    pb.UPDATING: m.UPDATING,
    pb.DEGRADED: m.DEGRADED,
    pb.DEPLOYMENT_FAILED: m.FAILED,
    pb.DELETING: m.DELETING,
}


def deployment_from_pb(message: pb.DeploymentEndpoints) -> Deployment:
    """The domain view of one deployment of an endpoint snapshot."""
    versions = {}
    for served in message.versions:
        batching = batching_from_pb(served.batching)
        versions[served.version] = ServedVersion(
            version=served.version,
            signature=signature_from_pb(served.signature),
            # Generative models run one sequence at a time (the ModelConfig they report says 1 too).
            max_batch_size=1 if served.streaming else batching.max_batch_size,
            streaming=served.streaming,
            aliases=tuple(served.aliases),
            architecture=served.architecture,
            batching=batching,
        )
    return Deployment(
        name=message.name,
        versions=versions,
        endpoints=tuple(Endpoint(e.address, e.version, e.replica_id) for e in message.endpoints),
        default_version=message.default_version,
        canary_version=message.canary_version,
        canary_weight_percent=message.canary_weight_percent,
        state=_STATES.get(message.state, m.UNSPECIFIED),
        target_replicas=message.target_replicas,
        max_replicas=message.max_replicas,
        # A scheduler older than tenants names none: its deployments are the default tenant's.
        tenant=message.tenant or m.DEFAULT_TENANT,
    )


def _acting_for() -> tuple[tuple[str, str], ...]:
    """The caller's ``maas-tenant`` when it (an admin) acts within one tenant here: a call made on its behalf
    does so too (the tenant a deployment it loads belongs to, what it lists)."""
    principal = current_principal.get()
    if principal is None or principal.acting_for is None:
        return ()
    return ((TENANT_METADATA, principal.acting_for),)


def status_from_pb(message: pb.Deployment) -> DeploymentStatus:
    return DeploymentStatus(
        name=message.name,
        model=message.spec.model,
        state=_STATES.get(message.state, m.UNSPECIFIED),
        message=message.message,
        version=message.version,
        generation=message.generation,
        min_replicas=message.spec.min_replicas,
        tenant=message.tenant or m.DEFAULT_TENANT,
    )


class SchedulerLink:
    """One channel to the scheduler for the endpoint stream, load reports and deployment control.

    Args:
        channel: A channel made with ``make_channel`` (retries of idempotent calls, tracing, token).
        registry: The registry client (RepositoryIndex lists its models).
        gateway_id: Stable for this process: the scheduler keys load reports by it.
        timeout_s: Deadline of unary calls.
        backoff_max_s: Longest pause between reconnection attempts of the endpoint stream.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        registry: RegistryClient | None,
        gateway_id: str,
        *,
        timeout_s: float = 30.0,
        backoff_max_s: float = 5.0,
        caller_channel: grpc.aio.Channel | None = None,
    ) -> None:
        self._channel = channel
        self._stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        # Deployment control runs as the gateway's caller (their key, their tenant), on a channel that
        # carries no credentials of the gateway's own.
        self._caller_channel = caller_channel
        self._caller_stub = None if caller_channel is None else scheduler_pb2_grpc.SchedulerServiceStub(caller_channel)
        self._registry = registry
        self._gateway_id = gateway_id
        self._timeout_s = timeout_s
        self._backoff_max_s = backoff_max_s

    @classmethod
    def connect(
        cls, target: str, registry_target: str | None, settings: CommonSettings, gateway_id: str, backoff_max_s: float
    ) -> SchedulerLink:
        registry = RegistryClient.connect(registry_target, settings) if registry_target else None
        channel = make_channel(target, settings, [SERVICE])
        caller_channel = make_channel(target, settings, [SERVICE], token="")
        return cls(
            channel,
            registry,
            gateway_id,
            timeout_s=settings.rpc_timeout_s,
            backoff_max_s=backoff_max_s,
            caller_channel=caller_channel,
        )

    async def close(self) -> None:
        await self._channel.close()
        if self._caller_channel is not None:
            await self._caller_channel.close()
        if self._registry is not None:
            await self._registry.close()

    async def _call(self, method: str, request: object, *, as_caller: bool = False) -> object:
        header = current_authorization.get() if as_caller else None
        stub, metadata = self._stub, None
        if header is not None and self._caller_stub is not None:
            stub, metadata = self._caller_stub, (("authorization", header), *_acting_for())
        try:
            return await getattr(stub, method)(request, timeout=self._timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    # -- EndpointSource ---------------------------------------------------------------------------------

    async def follow(self, apply: Callable[[Sequence[Deployment]], None], lost: Callable[[], None]) -> None:
        """Follow WatchEndpoints forever; reconnect with backoff, keeping the last snapshot meanwhile.

        The backoff starts again from its floor once a snapshot arrives (the scheduler sends one as soon as
        a watch starts), so a local restart of the scheduler is followed within ``backoff_max_s``.
        """
        backoff = 0.1
        failures = 0
        followed = False
        while True:
            call = self._stub.WatchEndpoints(pb.WatchEndpointsRequest())
            try:
                async for response in call:
                    apply([deployment_from_pb(d) for d in response.deployments])
                    backoff, failures, followed = 0.1, 0, True
                log.warning("endpoint_stream_ended")
            except grpc.aio.AioRpcError as exc:
                # The scheduler starting after the gateway (every `maas up`: it migrates its database first)
                # is expected: until the first snapshot, an unreachable scheduler is said quietly.
                failures += 1
                quiet = exc.code() == grpc.StatusCode.UNAVAILABLE and (failures == 1 or not followed)
                level = log.info if quiet else log.warning
                level("endpoint_stream_failed", code=exc.code().name, error=exc.details(), retry_in_s=backoff)
            except asyncio.CancelledError:
                call.cancel()
                raise
            lost()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._backoff_max_s)

    # -- LoadSink ---------------------------------------------------------------------------------------

    async def report(self, ongoing: Mapping[str, float]) -> None:
        await self._call("ReportLoad", pb.ReportLoadRequest(gateway_id=self._gateway_id, ongoing=dict(ongoing)))

    # -- DeploymentControl ------------------------------------------------------------------------------

    async def get(self, name: str) -> DeploymentStatus | None:
        found = await self._get_pb(name)
        return None if found is None else status_from_pb(found)

    async def _get_pb(self, name: str) -> pb.Deployment | None:
        try:
            response = await self._call("GetDeployment", pb.GetDeploymentRequest(name=name), as_caller=True)
        except NotFound:
            return None
        assert isinstance(response, pb.GetDeploymentResponse)
        return response.deployment

    async def list_deployments(self) -> list[DeploymentStatus]:
        statuses: list[DeploymentStatus] = []
        token = ""
        while True:
            response = await self._call(
                "ListDeployments", pb.ListDeploymentsRequest(page_size=100, page_token=token), as_caller=True
            )
            assert isinstance(response, pb.ListDeploymentsResponse)
            statuses.extend(status_from_pb(d) for d in response.deployments)
            token = response.next_page_token
            if not token:
                return statuses

    async def apply(self, options: LoadOptions) -> DeploymentStatus:
        existing = await self._get_pb(options.name)
        spec = pb.DeploymentSpec()
        if existing is not None:
            spec.CopyFrom(existing.spec)
        else:
            spec.model, spec.name, spec.min_replicas = options.name, options.name, 1
        if options.version is not None:
            spec.version = options.version
        if options.min_replicas is not None:
            spec.min_replicas = options.min_replicas
        if options.max_replicas is not None:
            spec.max_replicas = options.max_replicas
        if options.max_batch_size is not None:
            spec.batching.max_batch_size = options.max_batch_size
        if options.max_queue_delay_us is not None:
            spec.batching.max_queue_delay_us = options.max_queue_delay_us
        if existing is None:
            created = await self._call("CreateDeployment", pb.CreateDeploymentRequest(spec=spec), as_caller=True)
            assert isinstance(created, pb.CreateDeploymentResponse)
            return status_from_pb(created.deployment)
        updated = await self._call("UpdateDeployment", pb.UpdateDeploymentRequest(spec=spec), as_caller=True)
        assert isinstance(updated, pb.UpdateDeploymentResponse)
        return status_from_pb(updated.deployment)

    async def delete(self, name: str) -> None:
        await self._call("DeleteDeployment", pb.DeleteDeploymentRequest(name=name), as_caller=True)

    async def registry_models(self) -> list[str]:
        if self._registry is None:
            return []
        # The gateway's own credentials see every tenant: list as the caller's tenant sees the registry.
        scope = caller_scope()
        metadata = None if scope is None else ((TENANT_METADATA, scope),)
        names: list[str] = []
        token = ""
        while True:
            response = await self._registry.list_models(page_size=100, page_token=token, metadata=metadata)
            names.extend(model.name for model in response.models)
            token = response.next_page_token
            if not token:
                return names
