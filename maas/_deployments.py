"""``client.deployments``: inference deployments (replicas of a registry model behind the gateway)."""

from __future__ import annotations

import asyncio

from maas._rpc import Connection
from maas.scheduler.v1 import scheduler_pb2 as pb

from shared.errors import DeadlineExceeded, FailedPrecondition
from shared.grpc.calls import new_request_id


def _spec(spec: pb.DeploymentSpec | str) -> pb.DeploymentSpec:
    return pb.DeploymentSpec(model=spec, min_replicas=1) if isinstance(spec, str) else spec


class AsyncDeployments:
    """Deployments: ``spec`` arguments are a ``DeploymentSpec`` or a model name (one replica of its latest
    version, named after the model)."""

    def __init__(self, scheduler: Connection) -> None:
        self._scheduler = scheduler

    async def create(self, spec: pb.DeploymentSpec | str, *, request_id: str | None = None) -> pb.Deployment:
        """Deploy a registry model; replicas start in the background (see :meth:`wait_ready`).

        The request carries ``request_id`` (a fresh one when None), which the scheduler deduplicates on, so
        the call is retried on UNAVAILABLE without risk of a second deployment.
        """
        request = pb.CreateDeploymentRequest(spec=_spec(spec), request_id=request_id or new_request_id())
        response: pb.CreateDeploymentResponse = await self._scheduler.call("CreateDeployment", request, safe=True)
        return response.deployment

    async def update(self, spec: pb.DeploymentSpec | str) -> pb.Deployment:
        """Replace a deployment's spec; a new version rolls out replica by replica (no request fails)."""
        request = pb.UpdateDeploymentRequest(spec=_spec(spec))
        response: pb.UpdateDeploymentResponse = await self._scheduler.call("UpdateDeployment", request)
        return response.deployment

    async def get(self, name: str) -> pb.Deployment:
        """A deployment with its replicas."""
        response: pb.GetDeploymentResponse = await self._scheduler.call(
            "GetDeployment", pb.GetDeploymentRequest(name=name)
        )
        return response.deployment

    async def list(self) -> list[pb.Deployment]:
        """Every deployment the caller sees (all pages)."""
        deployments: list[pb.Deployment] = []
        token = ""
        while True:
            request = pb.ListDeploymentsRequest(page_token=token)
            response: pb.ListDeploymentsResponse = await self._scheduler.call("ListDeployments", request)
            deployments.extend(response.deployments)
            token = response.next_page_token
            if not token:
                return deployments

    async def delete(self, name: str) -> None:
        """Remove a deployment: it leaves the gateway's endpoints, then its replicas drain and stop."""
        await self._scheduler.call("DeleteDeployment", pb.DeleteDeploymentRequest(name=name))

    async def wait_ready(self, name: str, *, timeout_s: float = 600.0, poll_s: float = 0.5) -> pb.Deployment:
        """Wait until the deployment is READY and return it.

        Raises:
            FailedPrecondition: It FAILED (reason ``DEPLOYMENT_FAILED``; the message says why).
            DeadlineExceeded: ``timeout_s`` passed first (reason ``DEPLOYMENT_NOT_READY``).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            deployment = await self.get(name)
            if deployment.state == pb.DEPLOYMENT_READY:
                return deployment
            if deployment.state == pb.DEPLOYMENT_FAILED:
                raise FailedPrecondition(f"deployment {name} failed: {deployment.message}", reason="DEPLOYMENT_FAILED")
            if loop.time() >= deadline:
                raise DeadlineExceeded(
                    f"deployment {name} is not ready after {timeout_s:g} s "
                    f"({pb.DeploymentState.Name(deployment.state)}: {deployment.message})",
                    reason="DEPLOYMENT_NOT_READY",
                )
            await asyncio.sleep(poll_s)
