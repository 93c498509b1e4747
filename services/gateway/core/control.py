"""The model repository RPCs: load (create or update a deployment and wait for it), unload, index."""

from __future__ import annotations

import time
from collections.abc import Callable

from services.gateway.core import model as m
from services.gateway.core.model import DeploymentStatus, IndexEntry, LoadOptions
from services.gateway.core.ports import DeploymentControl
from services.gateway.core.table import EndpointTable
from shared.errors import DeadlineExceeded, FailedPrecondition, NotFound

# How the repository extension names a deployment's state.
_INDEX_STATE = {
    m.READY: "READY",
    m.UPDATING: "READY",
    m.DEGRADED: "READY",
    m.DEPLOYING: "LOADING",
    m.DELETING: "UNLOADING",
    m.FAILED: "UNAVAILABLE",
}


class Repository:
    """RepositoryModelLoad / Unload / Index over the scheduler's deployments and the registry's models.

    Args:
        control: The scheduler's deployment API and the registry's model list.
        table: The endpoint table, so that a load returns only once this gateway routes to the replicas.
        poll_s: Longest pause between two looks at the deployment while waiting.
        clock: Monotonic seconds.
    """

    def __init__(
        self,
        control: DeploymentControl,
        table: EndpointTable,
        *,
        poll_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._control = control
        self._table = table
        self._poll_s = poll_s
        self._clock = clock

    async def load(self, options: LoadOptions, timeout: float) -> DeploymentStatus:
        """Create (or update) the deployment and wait until it is READY and routable here.

        Raises:
            FailedPrecondition: The deployment failed (the scheduler's message says why).
            DeadlineExceeded: It was not ready within ``timeout`` seconds.
        """
        applied = await self._control.apply(options)
        deadline = self._clock() + timeout
        status = applied
        while True:
            if status.state == m.FAILED:
                raise FailedPrecondition(
                    f"model '{options.name}' failed to deploy: {status.message or 'no reason given'}",
                    metadata={"model": options.name},
                )
            if status.state == m.READY and status.generation >= applied.generation and self._routable(status):
                return status
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise DeadlineExceeded(
                    f"model '{options.name}' is not ready after {timeout:g} s (state {status.state}"
                    + (f": {status.message})" if status.message else ")"),
                    metadata={"model": options.name},
                )
            # A snapshot (new endpoints) ends the pause early; the scheduler's state is polled.
            await self._table.wait_changed(min(self._poll_s, remaining))
            current = await self._control.get(options.name)
            if current is None:
                raise FailedPrecondition(f"model '{options.name}' was deleted while loading")
            status = current

    def _routable(self, status: DeploymentStatus) -> bool:
        deployment = self._table.get(status.name)
        if deployment is None or deployment.default_version != status.version:
            return False
        return status.min_replicas == 0 or bool(deployment.ready(status.version))

    async def unload(self, name: str, timeout: float) -> None:
        """Delete the deployment; returns once this gateway stops routing to it (or after ``timeout``).

        Raises:
            NotFound: ``name`` is not deployed.
        """
        if await self._control.get(name) is None:
            raise NotFound(f"model '{name}' is not deployed", metadata={"model": name})
        await self._control.delete(name)
        deadline = self._clock() + timeout
        while self._table.get(name) is not None and (remaining := deadline - self._clock()) > 0:
            await self._table.wait_changed(remaining)

    async def index(self, ready_only: bool, scope: str | None = None) -> list[IndexEntry]:
        """Deployments with their state, then registry models that are not deployed (UNAVAILABLE); only
        the tenant ``scope``'s (None: every tenant's).

        The control runs as the caller (the scheduler and the registry list what the caller may see); the
        deployments are filtered here too, so that a control that lists more never shows another tenant's.
        """
        deployments = [d for d in await self._control.list_deployments() if scope is None or d.tenant == scope]
        models = await self._control.registry_models()
        entries = []
        deployed: set[str] = set()
        for status in sorted(deployments, key=lambda s: s.name):
            deployed.update((status.name, status.model))
            state = _INDEX_STATE.get(status.state, "UNAVAILABLE")
            reason = status.message if state != "READY" else ""
            entries.append(IndexEntry(status.name, str(status.version) if status.version else "", state, reason))
        for name in sorted(set(models) - deployed):
            entries.append(IndexEntry(name, "", "UNAVAILABLE", "registered, not deployed"))
        if ready_only:
            entries = [e for e in entries if e.state == "READY"]
        return entries
