"""One deployment's reconciler: drives its live replica set towards the desired one.

Each pass: ping the ready replicas (at most every health interval; a dead one, or one that missed two pings,
leaves the endpoints at once and is replaced), ask the autoscaler for the target, split it between the
default and the canary version, start what is missing on the current replica generation (failed starts are
retried with exponential backoff), drain what is extra, and retire the previous generation only once the
current one is complete: a rolling update never leaves a gap. Retiring a replica takes it out of the
endpoints (published), waits the drain delay so gateways see that, then stops it with a grace period.

Replica ids are ``dep-<name>-g<replica generation>-v<version>-<seq>``: also the Ray actor names, parsed
back by :func:`parse_replica_id` when a restarted scheduler re-attaches.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from services.scheduler.core.deployments.autoscaler import Autoscaler, split_replicas
from services.scheduler.core.deployments.model import (
    Deployment,
    DeploymentState,
    Replica,
    ReplicaState,
    ResolvedVersion,
)
from services.scheduler.core.deployments.ports import ReplicaHealth, ReplicaPool, ReplicaSpec

log = structlog.get_logger("maas.scheduler.deployments")
_REPLICA_ID = re.compile(r"^dep-(?P<name>.+)-g(?P<gen>\d+)-v(?P<version>\d+)-(?P<seq>\d+)$")
_MAX_MESSAGE = 500


def replica_id(name: str, generation: int, version: int, seq: int) -> str:
    return f"dep-{name}-g{generation}-v{version}-{seq}"


def parse_replica_id(value: str) -> tuple[str, int, int, int] | None:
    """(deployment name, replica generation, version, seq), or None for another kind of actor."""
    match = _REPLICA_ID.match(value)
    if match is None:
        return None
    return match["name"], int(match["gen"]), int(match["version"]), int(match["seq"])


@dataclass(frozen=True)
class ReconcilerConfig:
    health_interval_s: float = 1.0
    ping_timeout_s: float = 5.0
    drain_delay_s: float = 1.0
    stop_grace_s: float = 10.0
    start_timeout_s: float = 120.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0


@dataclass
class _Replica:
    id: str
    version: int
    generation: int
    seq: int
    address: str = ""
    state: ReplicaState = ReplicaState.STARTING
    misses: int = 0
    task: asyncio.Task[None] | None = None

    def view(self) -> Replica:
        return Replica(self.id, self.version, self.address, self.state)


class Reconciler:
    """The live state of one deployment and the task that reconciles it."""

    def __init__(
        self,
        deployment: Deployment,
        *,
        pool: ReplicaPool,
        autoscaler: Autoscaler,
        store: Callable[[Deployment], Awaitable[Deployment]],
        publish: Callable[[], None],
        config: ReconcilerConfig,
        clock: Callable[[], float],
        admit_replica: Callable[[Deployment], str | None] = lambda _deployment: None,
    ) -> None:
        self.deployment = deployment
        # Whether one more replica fits its tenant's quota and the pool (None) or why not.
        self._admit_replica = admit_replica
        self._quota_wait = ""
        # Preemption of replicas above the minimum: the target is capped at ``_cap`` until ``_cap_until``
        # (long enough for the job it made room for to be placed), then the autoscaler decides again.
        self._cap: int | None = None
        self._cap_until = 0.0
        self._cap_reason = ""
        self.lock = asyncio.Lock()
        self.deleting = False
        self.versions: dict[int, ResolvedVersion] = {}
        self._pool = pool
        self._autoscaler = autoscaler
        self._store = store
        self._publish = publish
        self._config = config
        self._clock = clock
        self._replicas: dict[str, _Replica] = {}
        self._seq = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._failures = 0
        self._last_error = ""
        self._next_start = 0.0
        self._last_health = -1e9
        self._had_ready = deployment.state not in (DeploymentState.DEPLOYING, DeploymentState.FAILED)
        self.target = deployment.target_replicas
        self._remember(deployment)

    # Views ---------------------------------------------------------------------------------------------

    def replicas(self) -> tuple[Replica, ...]:
        return tuple(r.view() for r in sorted(self._replicas.values(), key=lambda r: (r.generation, r.seq)))

    def ready(self) -> list[Replica]:
        return [r.view() for r in self._replicas.values() if r.state is ReplicaState.READY]

    def _remember(self, deployment: Deployment) -> None:
        self.versions[deployment.resolved.version] = deployment.resolved
        if deployment.canary is not None:
            self.versions[deployment.canary.version] = deployment.canary

    # Control -------------------------------------------------------------------------------------------

    def adopt(self, replica_id: str, generation: int, version: int, seq: int, address: str) -> None:
        """A replica a previous scheduler process started (found serving at ``address``)."""
        self._replicas[replica_id] = _Replica(replica_id, version, generation, seq, address, ReplicaState.READY)
        self._seq = max(self._seq, seq + 1)
        self._had_ready = True

    def preemptible(self) -> list[Replica]:
        """Its replicas above the minimum, newest first: what preemption may take (the minimum never)."""
        low, _ = self.deployment.spec.replica_bounds
        live = [r for r in self._replicas.values() if r.state is not ReplicaState.DRAINING]
        live.sort(key=lambda r: (r.generation, r.seq), reverse=True)
        return [r.view() for r in live[: max(len(live) - low, 0)]]

    def shed(self, count: int, hold_s: float, reason: str) -> None:
        """Give up ``count`` replicas (never below the minimum) for ``hold_s`` seconds; they drain first."""
        low, _ = self.deployment.spec.replica_bounds
        live = sum(r.state is not ReplicaState.DRAINING for r in self._replicas.values())
        self._cap = max(low, live - count)
        self._cap_until = self._clock() + hold_s
        self._cap_reason = reason
        self.wake()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"deployment-{self.deployment.name}")

    def wake(self) -> None:
        self._wake.set()

    def apply(self, deployment: Deployment) -> None:
        """A new spec (stored already); the next pass acts on it."""
        self.deployment = deployment
        self._remember(deployment)
        self._failures, self._next_start, self._last_error = 0, 0.0, ""
        self.wake()

    async def close(self) -> None:
        """Stop reconciling; replicas keep running (a restarted scheduler re-attaches to them)."""
        tasks = [t for t in [self._task, *self._background, *(r.task for r in self._replicas.values())] if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def teardown(self) -> None:
        """For a deletion: stop reconciling, take every replica out of the endpoints, drain and stop them."""
        self.deleting = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for replica in list(self._replicas.values()):
            self._retire(replica)
        self._publish()
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # The loop ------------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._pass()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconcile_failed", deployment=self.deployment.name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._config.health_interval_s)

    async def _pass(self) -> None:
        now = self._clock()
        if now - self._last_health >= self._config.health_interval_s:
            self._last_health = now
            await self._check_health()
        d = self.deployment
        low, high = d.spec.replica_bounds
        self.target = self._autoscaler.target(d.name, d.spec.autoscaling, low, high, self._clock())
        if self._cap is not None:
            if self._clock() < self._cap_until:
                self.target = max(low, min(self.target, self._cap))
            else:
                self._cap = None
        weight = d.spec.canary.weight_percent if d.canary is not None and d.spec.canary is not None else 0
        n_default, n_canary = split_replicas(self.target, weight)
        wanted = {d.version: n_default}
        if d.canary is not None:
            wanted[d.canary_version] = n_canary
        gen = self.deployment.replica_generation
        current = [r for r in self._replicas.values() if r.generation == gen and r.state is not ReplicaState.DRAINING]
        for replica in current:
            if replica.version not in wanted:
                self._retire(replica)
        complete = True
        self._quota_wait = ""
        for version, count in wanted.items():
            mine = sorted(
                (r for r in current if r.version == version),
                key=lambda r: (r.state is ReplicaState.READY, -r.seq),
            )
            if len(mine) < count:
                complete = False
                if self._clock() >= self._next_start:
                    for _ in range(count - len(mine)):
                        refused = self._admit_replica(self.deployment)
                        if refused is not None:
                            self._quota_wait = refused
                            break
                        self._launch(version)
            elif len(mine) > count:
                for replica in mine[: len(mine) - count]:
                    self._retire(replica)  # starting ones first, then the newest
            if sum(r.state is ReplicaState.READY for r in mine) < count:
                complete = False
        old = [r for r in self._replicas.values() if r.generation != gen and r.state is not ReplicaState.DRAINING]
        if complete:
            for replica in old:
                self._retire(replica)
            old = []
        await self._update_state(current, bool(old))

    async def _update_state(self, current: list[_Replica], updating: bool) -> None:
        d = self.deployment
        ready = sum(r.state is ReplicaState.READY for r in current)
        low, _ = d.spec.replica_bounds
        needed = min(self.target, max(low, 1))
        message = ""
        if updating:
            state = DeploymentState.UPDATING
            message = f"rolling update: {ready}/{self.target} new replicas ready"
        elif ready >= needed:
            state = DeploymentState.READY
        elif self._failures and ready == 0:
            state = DeploymentState.FAILED
        elif self._had_ready:
            state = DeploymentState.DEGRADED
            message = f"{ready}/{self.target} replicas ready"
        else:
            state = DeploymentState.DEPLOYING
        if self._cap is not None:
            message = f"{ready}/{self.target} replicas ready; {self._cap_reason}"
        if self._quota_wait:
            message = f"{ready}/{self.target} replicas ready; waiting: {self._quota_wait}"
        if self._failures:
            wait = max(0.0, self._next_start - self._clock())
            message = f"replica start failed ({self._failures} in a row): {self._last_error}; retrying in {wait:.0f}s"
        message = message[:_MAX_MESSAGE]
        if (state, message, self.target) != (d.state, d.message, d.target_replicas):
            async with self.lock:
                if self.deleting:
                    return
                changed = self.deployment.with_changes(state=state, message=message, target_replicas=self.target)
                self.deployment = await self._store(changed)
            log.info("deployment_state", deployment=d.name, state=state.value, message=message, target=self.target)
            self._publish()

    # Health --------------------------------------------------------------------------------------------

    async def _check_health(self) -> None:
        ready = [r for r in self._replicas.values() if r.state is ReplicaState.READY]
        if not ready:
            return
        results = await asyncio.gather(
            *(self._pool.ping(r.id, self._config.ping_timeout_s) for r in ready), return_exceptions=True
        )
        lost = False
        for replica, health in zip(ready, results, strict=True):
            if health is ReplicaHealth.OK:
                replica.misses = 0
                continue
            replica.misses += 1
            if health is ReplicaHealth.DEAD or replica.misses >= 2:
                if self._replicas.get(replica.id) is replica and replica.state is ReplicaState.READY:
                    log.warning("replica_lost", deployment=self.deployment.name, replica=replica.id)
                    del self._replicas[replica.id]
                    self._spawn(self._pool.stop(replica.id, 0))
                    lost = True
        if lost:
            self._publish()

    # Starting and retiring -----------------------------------------------------------------------------

    def _launch(self, version: int) -> None:
        d = self.deployment
        seq, self._seq = self._seq, self._seq + 1
        rid = replica_id(d.name, self.deployment.replica_generation, version, seq)
        replica = _Replica(rid, version, self.deployment.replica_generation, seq)
        self._replicas[rid] = replica
        spec = ReplicaSpec(
            rid, d.spec.model, version, d.spec.batching, d.spec.resources, require_signature=d.spec.require_signature
        )
        replica.task = asyncio.create_task(self._start_replica(replica, spec), name=f"replica-{rid}")

    async def _start_replica(self, replica: _Replica, spec: ReplicaSpec) -> None:
        try:
            address = await self._pool.start(spec, self._config.start_timeout_s)
        except asyncio.CancelledError:
            self._replicas.pop(replica.id, None)
            self._spawn(self._pool.stop(replica.id, 0))
            raise
        except Exception as exc:  # noqa: BLE001 - any start failure is retried; its text is the message
            self._replicas.pop(replica.id, None)
            self._failures += 1
            self._last_error = str(exc) or type(exc).__name__
            delay = min(self._config.backoff_initial_s * 2 ** (self._failures - 1), self._config.backoff_max_s)
            self._next_start = self._clock() + delay
            log.warning("replica_start_failed", replica=replica.id, error=self._last_error, retry_in_s=delay)
            self._spawn(self._pool.stop(replica.id, 0))
            self.wake()
            return
        replica.task = None
        if self._replicas.get(replica.id) is not replica:
            self._spawn(self._pool.stop(replica.id, 0))  # retired while it started
            return
        replica.address, replica.state = address, ReplicaState.READY
        self._failures, self._last_error, self._had_ready = 0, "", True
        log.info("replica_ready", replica=replica.id, address=address)
        self._publish()
        self.wake()

    def _retire(self, replica: _Replica) -> None:
        if replica.state is ReplicaState.STARTING:
            if replica.task is not None:
                replica.task.cancel()
            self._replicas.pop(replica.id, None)
            return
        if replica.state is ReplicaState.DRAINING:
            return
        replica.state = ReplicaState.DRAINING
        self._publish()
        self._spawn(self._drain(replica))

    async def _drain(self, replica: _Replica) -> None:
        try:
            # Gateways must see the snapshot without this replica before it stops taking requests.
            await asyncio.sleep(self._config.drain_delay_s)
            await self._pool.stop(replica.id, self._config.stop_grace_s)
        finally:
            if self._replicas.get(replica.id) is replica:
                del self._replicas[replica.id]
            self._publish()

    def _spawn(self, awaitable: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await awaitable
            except Exception:
                log.exception("replica_task_failed", deployment=self.deployment.name)

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
