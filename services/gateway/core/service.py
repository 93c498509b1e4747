"""The inference path: route a request to a replica, hold it while none is ready, retry a lost replica."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

import structlog

from services.gateway.core.load import LoadTracker
from services.gateway.core.model import Deployment, Endpoint, Route
from services.gateway.core.ports import Replicas
from services.gateway.core.router import Router
from services.gateway.core.shm import SharedMemoryCall, SharedMemoryUnreachable
from services.gateway.core.statistics import VersionStats, merge
from services.gateway.core.table import EndpointTable, served_version
from shared.errors import DeadlineExceeded, MaasError, NotFound, ResourceExhausted, Unavailable

log = structlog.get_logger("maas.gateway")


def _NO_CANARY() -> float:
    # A draw that never falls in the canary's share.
    return 100.0


class _Attempts:
    """The state of one request across its attempts: deadlines, failed replicas."""

    __slots__ = ("call_deadline", "excluded", "failures", "hold_deadline", "last_error")

    def __init__(self, timeout: float | None, max_hold_s: float, now: float) -> None:
        # Without a client deadline the worker call has none either; only holding is bounded.
        self.call_deadline = None if timeout is None else now + timeout
        self.hold_deadline = now + (max_hold_s if timeout is None else timeout)
        self.excluded: set[str] | None = None
        self.failures = 0
        self.last_error = ""


class Gateway:
    """Routes inference requests over the endpoint table.

    The lookups take the caller's *scope* (see :class:`EndpointTable`): a deployment of another tenant is,
    to the caller, a model that is not deployed.

    Args:
        table: The endpoint table (fed by an endpoint source).
        replicas: The workers' data plane.
        load: Ongoing-request counts (reported to the scheduler by ``load.report_forever``).
        retries: Extra attempts on other replicas after one answers UNAVAILABLE.
        max_hold_s: Longest a request without a deadline waits for a ready replica.
        max_held: Requests that may wait at once (for a replica or for the endpoint table); beyond it,
            RESOURCE_EXHAUSTED: a burst against a model with no ready replica must not grow without bound.
        router: Replica choice (least outstanding, two random choices).
        clock: Monotonic seconds.
    """

    def __init__(
        self,
        table: EndpointTable,
        replicas: Replicas,
        load: LoadTracker,
        *,
        retries: int = 2,
        max_hold_s: float = 60.0,
        max_held: int = 10_000,
        router: Router | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.table = table
        self.load = load
        self._replicas = replicas
        self._router = router or Router()
        self._retries = retries
        self._max_hold_s = max_hold_s
        self._max_held = max_held
        self.held = 0
        self._clock = clock

    def apply_snapshot(self, deployments: Sequence[Deployment]) -> None:
        """Install a full endpoint snapshot: wakes held requests, forgets workers that left."""
        self.table.apply(deployments)
        self._replicas.retain(self.table.addresses())

    @property
    def ready(self) -> bool:
        """True while the table holds a current endpoint snapshot (ServerReady): not before the first
        one, nor while the stream to the scheduler is being re-established."""
        return self.table.in_sync

    def resolve(self, name: str, version: str, scope: str | None = None) -> Route:
        """See :meth:`EndpointTable.resolve`."""
        return self.table.resolve(name, version, scope)

    async def route(self, name: str, version: str, timeout: float | None, scope: str | None = None) -> Route:
        """:meth:`resolve`, holding a model the table does not know while the table is not current.

        Between a gateway's start (or a lost scheduler stream) and the next snapshot, an unknown model may
        well be deployed: the request waits for the snapshot (up to ``timeout``, or ``max_hold_s`` without
        one) as a request waits for a replica, instead of failing with NOT_FOUND. Another tenant's model
        is unknown to the caller: held alike while out of sync (answering at once would tell it exists),
        NOT_FOUND at once when in sync.
        """
        try:
            return self.table.resolve(name, version, scope)
        except NotFound:
            if self.table.in_sync:
                raise
        await self._await_current(name, timeout, scope)
        return self.table.resolve(name, version, scope)

    async def describe(self, name: str, version: str, timeout: float | None, scope: str | None = None) -> Route:
        """:meth:`lookup` (ModelMetadata, ModelConfig), holding like :meth:`route`."""
        if self.table.get(name, scope) is None and not self.table.in_sync:
            await self._await_current(name, timeout, scope)
        return self.lookup(name, version, scope)

    async def _await_current(self, name: str, timeout: float | None, scope: str | None) -> None:
        deadline = self._clock() + (self._max_hold_s if timeout is None else timeout)
        while not self.table.in_sync and self.table.get(name, scope) is None:
            if not await self._wait_changed(deadline - self._clock()):
                raise Unavailable(
                    f"model '{name}' is not known to the gateway yet: it is still learning the scheduler's "
                    "deployments (starting or reconnecting)",
                    retry_after_s=1.0,
                )

    def lookup(self, name: str, version: str, scope: str | None = None) -> Route:
        """Like :meth:`resolve` without the canary split: an empty version is the default version
        (what ModelMetadata, ModelConfig and ModelReady describe)."""
        deployment = self.table.deployment(name, scope)
        return Route(deployment, served_version(deployment, version, rand=_NO_CANARY), version)

    def model_ready(self, name: str, version: str, scope: str | None = None) -> bool:
        """True when the version (empty: the default) has at least one ready replica."""
        deployment = self.table.get(name, scope)
        if deployment is None:
            return False
        try:
            served = served_version(deployment, version, rand=_NO_CANARY)
        except MaasError:
            return False
        return bool(deployment.ready(served.version))

    async def _attempt(self, route: Route, attempts: _Attempts) -> tuple[Route, Endpoint, float | None]:
        """The next replica to try (holding until one is ready) and the seconds left for the call."""
        route, endpoint = await self._choose(route, attempts)
        remaining = None if attempts.call_deadline is None else attempts.call_deadline - self._clock()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded(f"deadline exceeded before model '{route.deployment.name}' could answer")
        return route, endpoint, remaining

    async def infer(
        self, route: Route, payload: bytes, timeout: float | None, shared: SharedMemoryCall | None = None
    ) -> bytes:
        """Forward ``payload`` (a serialized ModelInferRequest) to a replica of ``route``'s version.

        Holds while no replica is ready (the deployment scales from zero or replicas restart) and retries
        another replica when one answers UNAVAILABLE, within ``timeout`` seconds (None: no deadline; then
        holding is bounded by ``max_hold_s``). A request using shared memory (``shared``; ``payload`` is
        then unused) goes by reference to a replica on this host, inline to another.

        Raises:
            shared.errors.MaasError: DeadlineExceeded or Unavailable when no replica could answer in time;
                the worker's own error otherwise (RESOURCE_EXHAUSTED passes through unretried).
        """
        name = route.deployment.name
        self.load.begin(name)
        attempts = _Attempts(timeout, self._max_hold_s, self._clock())
        try:
            while True:
                route, endpoint, remaining = await self._attempt(route, attempts)
                address = endpoint.address
                self._router.acquire(address)
                try:
                    if shared is not None:
                        return await self._infer_shared(address, route.version, shared, remaining)
                    return await self._replicas.infer(address, route.version, payload, remaining)
                except Unavailable as exc:
                    self._failed(route, endpoint, attempts, exc)
                finally:
                    self._router.release(address)
        finally:
            self.load.end(name)

    async def _infer_shared(self, address: str, version: int, shared: SharedMemoryCall, timeout: float | None) -> bytes:
        try:
            return await self._replicas.infer(address, version, shared.payload, timeout, shared.windows)
        except SharedMemoryUnreachable:
            pass  # the replica cannot see this host's shared memory: the data travels in the request
        return shared.finish_inline(await self._replicas.infer(address, version, shared.inline(), timeout))

    async def stream(self, route: Route, payload: bytes, timeout: float | None) -> AsyncIterator[bytes]:
        """Like :meth:`infer` on a worker's ModelStreamInfer: yields the serialized stream responses.

        A replica lost before its first response is retried on another; after that the error reaches the
        caller (tokens already sent cannot be taken back).
        """
        name = route.deployment.name
        self.load.begin(name)
        attempts = _Attempts(timeout, self._max_hold_s, self._clock())
        try:
            while True:
                route, endpoint, remaining = await self._attempt(route, attempts)
                address = endpoint.address
                started = False
                self._router.acquire(address)
                messages = self._replicas.stream(address, route.version, payload, remaining)
                try:
                    async for message in messages:
                        started = True
                        yield message
                    return
                except Unavailable as exc:
                    if started:
                        raise
                    self._failed(route, endpoint, attempts, exc)
                finally:
                    self._router.release(address)
                    # Closing the worker's stream cancels it when our caller went away mid-stream.
                    aclose = getattr(messages, "aclose", None)
                    if aclose is not None:
                        await aclose()
        finally:
            self.load.end(name)

    async def _choose(self, route: Route, attempts: _Attempts) -> tuple[Route, Endpoint]:
        """The route as of now and a replica for it, holding until one is ready."""
        while True:
            route = self.table.current(route)
            endpoint = self._router.pick(route.deployment.ready(route.version), attempts.excluded)
            if endpoint is not None:
                return route, endpoint
            remaining = attempts.hold_deadline - self._clock()
            if remaining > 0:
                self.load.holding(route.deployment.name)
                if await self._wait_changed(remaining):
                    continue
            raise self._hold_expired(route, attempts)

    async def _wait_changed(self, timeout: float) -> bool:
        """Holds the caller until the table changes (True) or ``timeout`` passes (False), counted against
        ``max_held``."""
        if self.held >= self._max_held:
            raise ResourceExhausted(
                f"{self.held} requests already wait for a ready replica at this gateway; retry later",
                retry_after_s=1.0,
            )
        self.held += 1
        try:
            return await self.table.wait_changed(timeout)
        finally:
            self.held -= 1

    def _failed(self, route: Route, endpoint: Endpoint, attempts: _Attempts, exc: MaasError) -> None:
        attempts.failures += 1
        attempts.last_error = exc.message
        log.debug("replica_unavailable", model=route.deployment.name, address=endpoint.address, error=exc.message)
        if attempts.failures > self._retries:
            raise Unavailable(
                f"model '{route.deployment.name}' version {route.version}: {attempts.failures} replicas were "
                f"unavailable (last: {exc.message})",
                retry_after_s=1.0,
            )
        if attempts.excluded is None:
            attempts.excluded = set()
        attempts.excluded.add(endpoint.address)

    def _hold_expired(self, route: Route, attempts: _Attempts) -> MaasError:
        name, version = route.deployment.name, route.version
        detail = f"; last error: {attempts.last_error}" if attempts.last_error else ""
        if attempts.call_deadline is not None:
            return DeadlineExceeded(
                f"no replica of model '{name}' version {version} became ready within the request's deadline{detail}"
            )
        return Unavailable(
            f"no replica of model '{name}' version {version} became ready within {self._max_hold_s:g} s{detail}",
            retry_after_s=1.0,
        )

    async def provenance(self, route: Route, timeout: float | None) -> Mapping[str, str]:
        """Who signed the bytes ``route``'s version is served from, and their digest, as a ready replica
        that loaded them reports it (see ``Replicas.provenance``); empty when none is ready or answers.

        Asked of a replica rather than kept in the snapshot: only a worker knows which signatures verified
        against the bytes it loaded under the tenant's trust policy.
        """
        for endpoint in route.deployment.ready(route.version):
            try:
                return await self._replicas.provenance(endpoint.address, route.deployment.name, route.version, timeout)
            except MaasError as exc:
                log.debug("provenance_unavailable", address=endpoint.address, error=str(exc))
        return {}

    async def statistics(self, name: str, version: str, timeout: float, scope: str | None = None) -> list[VersionStats]:
        """Statistics summed over the ready replicas of one deployment (or all of ``scope``'s), one entry
        per version.

        Raises:
            NotFound: ``name`` is not deployed (for ``scope``), or does not serve ``version``.
        """
        deployments = [self.table.deployment(name, scope)] if name else self.table.deployments(scope)
        results: list[VersionStats] = []
        for deployment in sorted(deployments, key=lambda d: d.name):
            if version:
                versions = [served_version(deployment, version).version]
            else:
                versions = list(deployment.versions)
            addresses = sorted({e.address for v in versions for e in deployment.ready(v)})
            reports = await asyncio.gather(
                *(self._replicas.statistics(a, timeout) for a in addresses), return_exceptions=True
            )
            good: list[list[VersionStats]] = []
            for address, report in zip(addresses, reports, strict=True):
                if isinstance(report, BaseException):
                    # A replica that just left must not fail the whole answer; its counts are lost with it.
                    log.debug("statistics_unavailable", address=address, error=str(report))
                else:
                    good.append(report)
            results.extend(merge(deployment.name, versions, good))
        return results
