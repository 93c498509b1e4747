"""The endpoint table: the latest snapshot of every deployment, version resolution, change notification."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterable

from services.gateway.core.model import Deployment, Route, ServedVersion
from shared.errors import NotFound


class EndpointTable:
    """Deployments as of the latest endpoint snapshot.

    A snapshot replaces the whole table (deployments left out were deleted) and wakes every request held
    for a replica, which then looks again. The table is *in sync* from a snapshot until its source reports
    the stream lost (``mark_stale``): a table out of sync still routes to the replicas it knows, but a model it
    does not know may exist at the scheduler, so callers hold such requests instead of answering NOT_FOUND.

    Lookups take the caller's *scope*: the tenant whose deployments it may see (None: every tenant). A
    deployment of another tenant is, to that caller, exactly a model that is not deployed: same answer, same
    message, and it is never named in the list of deployed models.
    """

    def __init__(self, rand: Callable[[], float] = random.random) -> None:
        self._deployments: dict[str, Deployment] = {}
        self._changed = asyncio.Event()
        self._rand = rand
        self.in_sync = False

    def apply(self, deployments: Iterable[Deployment]) -> None:
        """Replace the table with a full snapshot and wake the waiters."""
        self._deployments = {d.name: d for d in deployments}
        self.in_sync = True
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def mark_stale(self) -> None:
        """The snapshot stream was lost: keep the deployments, but stop vouching that they are all there is."""
        self.in_sync = False

    def get(self, name: str, scope: str | None = None) -> Deployment | None:
        """The deployment called ``name``; None if there is none, or it is not of the tenant ``scope``."""
        deployment = self._deployments.get(name)
        if deployment is None or (scope is not None and deployment.tenant != scope):
            return None
        return deployment

    def deployments(self, scope: str | None = None) -> list[Deployment]:
        """Every deployment (of the tenant ``scope``)."""
        return [d for d in self._deployments.values() if scope is None or d.tenant == scope]

    def addresses(self) -> set[str]:
        """Every ready endpoint's address."""
        return {e.address for d in self._deployments.values() for e in d.endpoints}

    async def wait_changed(self, timeout: float | None) -> bool:
        """Wait for the next snapshot; False if ``timeout`` seconds passed first."""
        changed = self._changed
        if timeout is not None and timeout <= 0:
            return False
        try:
            await asyncio.wait_for(changed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def deployment(self, name: str, scope: str | None = None) -> Deployment:
        """The deployment called ``name`` (of the tenant ``scope``); NotFound naming the deployed ones the
        caller may see otherwise."""
        # Every request passes here: the tenant check is one comparison, inline (no call, no allocation).
        deployment = self._deployments.get(name)
        if deployment is None or (scope is not None and deployment.tenant != scope):
            deployed = ", ".join(sorted(d.name for d in self.deployments(scope))) or "none"
            raise NotFound(f"model '{name}' is not deployed (deployed: {deployed})", metadata={"model": name})
        return deployment

    def resolve(self, name: str, version: str, scope: str | None = None) -> Route:
        """Choose the version a request for ``name`` at ``version`` goes to.

        ``version`` is a number, an alias (a served version whose aliases include it) or empty: the
        default version, or the canary for its share of requests. A named version is never split.

        Raises:
            NotFound: The model is not deployed (for the tenant ``scope``) or does not serve that version.
        """
        deployment = self.deployment(name, scope)
        return Route(deployment, served_version(deployment, version, self._rand), version)

    def current(self, route: Route) -> Route:
        """``route`` against the latest snapshot: the same version while it is still served, else resolved
        again (a rolling update replaced it while the request waited). The request stays with the
        deployment's tenant: should the name now be another tenant's (deleted and created again while the
        request waited), it is not deployed any more."""
        deployment = self._deployments.get(route.deployment.name)
        if deployment is route.deployment:
            return route  # the common case, on every attempt: nothing more to check
        tenant = route.deployment.tenant
        if (
            deployment is not None
            and deployment.tenant == tenant
            and (served := deployment.versions.get(route.version)) is not None
        ):
            return Route(deployment, served, route.requested)
        return self.resolve(route.deployment.name, route.requested, tenant)


def served_version(deployment: Deployment, version: str, rand: Callable[[], float] = random.random) -> ServedVersion:
    """The version of ``deployment`` that ``version`` (number, alias or empty) names; see ``resolve``."""
    versions = deployment.versions
    if not version:
        chosen = deployment.default_version
        if deployment.canary_version and deployment.canary_weight_percent > 0:
            if rand() * 100.0 < deployment.canary_weight_percent:
                chosen = deployment.canary_version
        served = versions.get(chosen)
        if served is None:
            raise NotFound(
                f"model '{deployment.name}' has no version ready to serve yet", metadata={"model": deployment.name}
            )
        return served
    if version.isascii() and version.isdigit():
        served = versions.get(int(version))
        if served is not None:
            return served
    else:
        for served in versions.values():
            if version in served.aliases:
                return served
    raise NotFound(
        f"model '{deployment.name}' has no version '{version}' (served: {describe_versions(deployment)})",
        metadata={"model": deployment.name, "version": version},
    )


def describe_versions(deployment: Deployment) -> str:
    """``3 (production), 4`` : the served versions with their aliases, for error messages."""
    parts = []
    for number in sorted(deployment.versions):
        aliases = deployment.versions[number].aliases
        parts.append(f"{number} ({', '.join(aliases)})" if aliases else str(number))
    return ", ".join(parts) or "none"
