"""The scheduler's deployment use cases: create, get, list, update, delete, watch endpoints, report load.

:class:`DeploymentService` stores deployments (a :class:`DeploymentRepository`), resolves versions in the
registry (a :class:`ModelResolver`) and runs one :class:`~services.scheduler.core.deployments.reconciler.Reconciler`
per deployment over a :class:`ReplicaPool`. The replica set is the pool's truth: at start the service
re-attaches to the replicas a previous process left (and stops those of deleted deployments).

Tenants: a deployment belongs to the tenant that created it and serves that tenant's models only (versions
are resolved as that tenant sees the registry). The other use cases take the caller's *scope* (the tenant it
may see, None: every tenant), given by the API layer; a deployment of another tenant is reported exactly as
a missing one. Names stay unique across tenants: the gateway routes by name.

Endpoint watchers follow a sequence number bumped at every change: each gets the snapshot as it is when it
looks, so a slow watcher skips intermediate snapshots instead of building a backlog.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog

from services.scheduler.core.deployments.autoscaler import Autoscaler
from services.scheduler.core.deployments.model import (
    Deployment,
    DeploymentEndpoints,
    DeploymentSpec,
    DeploymentState,
    Endpoint,
    ResolvedVersion,
    ServedVersion,
    deployment_not_found,
    needs_new_generation,
    validate_deployment_spec,
)
from services.scheduler.core.deployments.ports import DeploymentRepository, ModelResolver, ReplicaPool
from services.scheduler.core.deployments.reconciler import Reconciler, ReconcilerConfig, parse_replica_id
from services.scheduler.core.events import EventBus, EventKind
from services.scheduler.core.jobs.model import Page, check_request_id, request_conflict, visible_to
from services.scheduler.core.policy import NONE, Candidate, Resources, replica_demand
from services.scheduler.core.quota import ReplicaQuota
from shared import names
from shared.errors import FailedPrecondition, InvalidArgument, Unavailable
from shared.paging import encode_token, parse_page

T = TypeVar("T")
log = structlog.get_logger("maas.scheduler.deployments")
PoolFactory = Callable[[], ReplicaPool]
Snapshot = tuple[DeploymentEndpoints, ...]
_MAX_GATEWAY_ID = 256


class DeploymentService:
    """Inference deployments: the use cases the API calls and the reconcilers that serve them."""

    def __init__(
        self,
        repository: DeploymentRepository,
        pool_factory: PoolFactory,
        resolver: ModelResolver,
        *,
        config: ReconcilerConfig | None = None,
        default_cpus: float = 1.0,
        report_ttl_s: float = 10.0,
        quota: ReplicaQuota | None = None,
        events: EventBus | None = None,
        sweep_at_start: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._repo = repository
        self._sweep_at_start = sweep_at_start
        self._events = events or EventBus()
        self._quota = quota
        self._pool_factory = pool_factory
        self._pool: ReplicaPool | None = None
        self._resolver = resolver
        self._config = config or ReconcilerConfig()
        self._default_cpus = default_cpus
        self._clock = clock
        self._autoscaler = Autoscaler(report_ttl_s)
        self._reconcilers: dict[str, Reconciler] = {}
        self._deletions: dict[str, asyncio.Task[None]] = {}
        self._seq = 0
        self._changed = asyncio.Event()
        self._closing = False

    # Plumbing -----------------------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    def _get_pool(self) -> ReplicaPool:
        # Lazily: a scheduler without deployments never starts Ray.
        if self._pool is None:
            self._pool = self._pool_factory()
        return self._pool

    def _publish(self) -> None:
        self._seq += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def _store(self, deployment: Deployment) -> Deployment:
        before = self._reconcilers.get(deployment.name)
        stored = await self._run(self._repo.save, deployment)
        if before is not None:
            old = before.deployment
            if stored.target_replicas != old.target_replicas:
                kind = EventKind.DEPLOYMENT_SCALED
            elif (stored.state, stored.message) != (old.state, old.message):
                kind = EventKind.DEPLOYMENT_STATE
            else:
                return stored
            reason = stored.message or stored.state.value
            self._events.publish(
                kind, stored.tenant, reason, deployment=stored.name, target_replicas=stored.target_replicas
            )
        return stored

    def _reconciler(self, deployment: Deployment) -> Reconciler:
        reconciler = Reconciler(
            deployment,
            pool=self._get_pool(),
            autoscaler=self._autoscaler,
            store=self._store,
            publish=self._publish,
            config=self._config,
            clock=self._clock,
            admit_replica=self._admit_replica,
        )
        self._reconcilers[deployment.name] = reconciler
        return reconciler

    # Lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the stored deployments, re-attach to their live replicas, stop strays, reconcile.

        With no deployment stored the pool is not even created (a local Ray is not started for nothing),
        unless ``sweep_at_start``: on a Ray cluster that outlives the scheduler, replicas of deployments
        deleted while it was down (or whose deletion a killed process left half done) would run forever.
        """
        stored = await self._run(self._repo.all)
        if not stored and not self._sweep_at_start:
            return
        pool = self._get_pool()
        reconcilers = {d.name: self._reconciler(d) for d in stored}
        for found in await pool.find():
            parsed = parse_replica_id(found.replica_id)
            if parsed is None:
                continue
            name, generation, version, seq = parsed
            reconciler = reconcilers.get(name)
            if reconciler is None or not found.address:
                log.info("replica_stray_stopped", replica=found.replica_id)
                await pool.stop(found.replica_id, 0)
                continue
            reconciler.adopt(found.replica_id, generation, version, seq, found.address)
            log.info("replica_reattached", replica=found.replica_id, address=found.address)
        for reconciler in reconcilers.values():
            if reconciler.deployment.state is DeploymentState.DELETING:
                self._deletions[reconciler.deployment.name] = asyncio.create_task(self._finish_delete(reconciler))
            else:
                reconciler.start()
        self._publish()

    async def close(self) -> None:
        """Stop reconciling (replicas keep running for the next process) and end every watch."""
        self._closing = True
        for task in self._deletions.values():
            task.cancel()
        await asyncio.gather(*self._deletions.values(), return_exceptions=True)
        await asyncio.gather(*(r.close() for r in self._reconcilers.values()), return_exceptions=True)
        close = getattr(self._pool, "close", None)
        if close is not None:
            await close()
        self._publish()

    # Use cases ----------------------------------------------------------------------------------------

    async def create(self, spec: DeploymentSpec, tenant: str, request_id: str = "") -> Deployment:
        """Validate, resolve the versions (in ``tenant``'s models), store as DEPLOYING for ``tenant`` and
        start reconciling.

        A ``request_id`` makes the creation idempotent within ``tenant``: a retry (also one racing the
        first) returns the deployment the first created; AlreadyExists if its normalised spec differs.
        """
        check_request_id(request_id)
        spec = validate_deployment_spec(spec, self._default_cpus)
        if request_id:
            # A retry is answered from the store alone: no registry call, whose answer may have changed.
            earlier = await self._run(self._repo.by_request_id, tenant, request_id)
            if earlier is not None:
                return self._retried(earlier, spec, request_id)
        if self._quota is not None:
            self._quota.check_create(tenant, spec)
        resolved = await self._resolver.resolve(spec.model, spec.version, tenant)
        canary = await self._resolve_canary(spec, resolved, tenant)
        await self._check_signed(spec, tenant, resolved, canary)
        now = datetime.now(UTC)
        deployment = Deployment(
            name=spec.name,
            spec=spec,
            state=DeploymentState.DEPLOYING,
            resolved=resolved,
            canary=canary,
            tenant=tenant,
            message="starting replicas",
            create_time=now,
            update_time=now,
            request_id=request_id,
        )
        stored, created = await self._run(self._repo.insert_or_get, deployment)
        if not created:
            return self._retried(stored, spec, request_id)
        log.info("deployment_created", deployment=stored.name, tenant=tenant, version=stored.version)
        self._reconciler(stored).start()
        self._publish()
        return stored

    def _admit_replica(self, deployment: Deployment) -> str | None:
        return None if self._quota is None else self._quota.admit(deployment.tenant, deployment.spec)

    def preemptible(self, priority: int) -> list[Candidate]:
        """Every deployment's replicas above its minimum, as preemption candidates of ``priority``."""
        found = []
        for reconciler in self._reconcilers.values():
            if reconciler.deleting:
                continue
            d = reconciler.deployment
            r = d.spec.resources
            for order, replica in enumerate(reconciler.preemptible()):
                # Replicas sort after every job of their priority (seq), newest first within a deployment.
                found.append(
                    Candidate(
                        replica.id, d.tenant, priority, 2**62 - order, replica_demand(1, r.cpus, r.gpus, r.memory_bytes)
                    )
                )
        return found

    def shed(self, replica_ids: list[str], hold_s: float, reason: str) -> None:
        """Give up those replicas (their deployments scale down, draining first: no request fails)."""
        counts: dict[str, int] = {}
        for replica_id in replica_ids:
            parsed = parse_replica_id(replica_id)
            if parsed is not None:
                counts[parsed[0]] = counts.get(parsed[0], 0) + 1
        for name, count in counts.items():
            reconciler = self._reconcilers.get(name)
            if reconciler is not None:
                log.info("replicas_preempted", deployment=name, count=count, reason=reason)
                reconciler.shed(count, hold_s, reason)

    def placed(self) -> dict[str, Resources]:
        """Tenant -> what its deployments' live replicas hold now (starting, serving and draining ones)."""
        held: dict[str, Resources] = {}
        for reconciler in self._reconcilers.values():
            deployment = reconciler.deployment
            resources = deployment.spec.resources
            demand = replica_demand(len(reconciler.replicas()), resources.cpus, resources.gpus, resources.memory_bytes)
            held[deployment.tenant] = held.get(deployment.tenant, NONE) + demand
        return held

    def _retried(self, stored: Deployment, spec: DeploymentSpec, request_id: str) -> Deployment:
        """The deployment an earlier request with ``request_id`` created, if it asked for ``spec`` too."""
        conflict = request_conflict("deployment", stored.name, request_id, stored.spec.to_dict(), spec.to_dict())
        if conflict is not None:
            raise conflict
        log.info("deployment_create_retried", deployment=stored.name, tenant=stored.tenant, request_id=request_id)
        return self._live(stored)

    async def _resolve_canary(
        self, spec: DeploymentSpec, default: ResolvedVersion, tenant: str
    ) -> ResolvedVersion | None:
        if spec.canary is None:
            return None
        canary = await self._resolver.resolve(spec.model, spec.canary.version, tenant)
        if canary.version == default.version:
            raise InvalidArgument.field("spec.canary.version", f"resolves to the default version {canary.version}")
        return canary

    async def _check_signed(self, spec: DeploymentSpec, tenant: str, *versions: ResolvedVersion | None) -> None:
        """With ``require_signature``, refuses up front a version no key the tenant trusts signed, rather than
        letting its replicas fail to load it over and over. The workers still verify each signature against
        the bytes they load: this check reads the registry's records only."""
        if not spec.require_signature:
            return
        for resolved in versions:
            if resolved is None:
                continue
            problem = await self._resolver.signature_problem(spec.model, resolved.version, tenant)
            if problem:
                raise FailedPrecondition(
                    f"model {spec.model} version {resolved.version} cannot be deployed with require_signature: "
                    f"{problem}",
                    reason="SIGNATURE_REQUIRED",
                )

    async def _visible(self, name: str, scope: str | None) -> Deployment:
        """The deployment called ``name`` as the caller of ``scope`` may see it (live if served here);
        NotFound, as for a missing one, if it is another tenant's."""
        reconciler = self._reconcilers.get(name)
        deployment = reconciler.deployment if reconciler is not None else await self._run(self._repo.get, name)
        if not visible_to(deployment.tenant, scope):
            raise deployment_not_found(name)
        return deployment

    async def get(self, name: str, scope: str | None = None) -> Deployment:
        names.check_name(name, "name")
        return self._live(await self._visible(name, scope))

    async def list_deployments(self, page_size: int, page_token: str, scope: str | None = None) -> Page[Deployment]:
        """Deployments by name (only those of the tenant ``scope``, None: every tenant)."""
        query: dict[str, Any] = {}
        page = parse_page(page_size, page_token, query)
        stored = await self._run(self._repo.list_deployments, page.after, page.size + 1, scope)
        items = [self._live(d) for d in stored]
        if len(items) <= page.size:
            return Page(items=items)
        kept = items[: page.size]
        return Page(items=kept, next_page_token=encode_token(kept[-1].name, query))

    def _live(self, deployment: Deployment) -> Deployment:
        reconciler = self._reconcilers.get(deployment.name)
        if reconciler is None:
            return deployment
        return reconciler.deployment.with_changes(replicas=reconciler.replicas())

    async def update(self, spec: DeploymentSpec, scope: str | None = None) -> Deployment:
        """Replace the spec: a rolling update when versions, batching or resources change. The deployment
        keeps its tenant, whose models the new versions must be."""
        spec = validate_deployment_spec(spec, self._default_cpus)
        # Before anything that would tell that it exists: NotFound for another tenant's.
        tenant = (await self._visible(spec.name, scope)).tenant
        reconciler = self._reconcilers.get(spec.name)
        if reconciler is None:
            # Stored but not served by this process (yet).
            raise Unavailable(f"deployment {spec.name} is not loaded yet; try again", retry_after_s=1.0)
        if reconciler.deleting or reconciler.deployment.state is DeploymentState.DELETING:
            raise FailedPrecondition(f"deployment {spec.name} is being deleted", reason="DEPLOYMENT_DELETING")
        resolved = await self._resolver.resolve(spec.model, spec.version, tenant)
        canary = await self._resolve_canary(spec, resolved, tenant)
        await self._check_signed(spec, tenant, resolved, canary)
        async with reconciler.lock:
            if reconciler.deleting:
                raise FailedPrecondition(f"deployment {spec.name} is being deleted", reason="DEPLOYMENT_DELETING")
            old = reconciler.deployment
            new = replace(old, spec=spec, resolved=resolved, canary=canary, generation=old.generation + 1)
            if needs_new_generation(old, new):
                new = replace(new, replica_generation=old.generation + 1)
            stored = await self._store(new)
            reconciler.apply(stored)
        log.info("deployment_updated", deployment=spec.name, generation=stored.generation, version=stored.version)
        self._publish()
        return stored.with_changes(replicas=reconciler.replicas())

    async def delete(self, name: str, scope: str | None = None) -> None:
        """Take the deployment out of the endpoints, drain and stop its replicas, forget it. Idempotent
        (NotFound once it is gone, and for another tenant's)."""
        names.check_name(name, "name")
        await self._visible(name, scope)
        task = self._deletions.get(name)
        if task is None:
            reconciler = self._reconcilers.get(name)
            if reconciler is None:
                await self._run(self._repo.get, name)  # NotFound
                await self._run(self._repo.delete, name)
                return
            async with reconciler.lock:
                reconciler.deleting = True
                reconciler.deployment = await self._store(
                    reconciler.deployment.with_changes(state=DeploymentState.DELETING, message="deleting")
                )
            self._publish()
            task = self._deletions[name] = asyncio.create_task(self._finish_delete(reconciler))
        await asyncio.shield(task)

    async def _finish_delete(self, reconciler: Reconciler) -> None:
        name = reconciler.deployment.name
        try:
            await reconciler.teardown()
            await self._run(self._repo.delete, name)
            self._reconcilers.pop(name, None)
            self._autoscaler.forget(name)
            log.info("deployment_deleted", deployment=name)
            self._publish()
        finally:
            self._deletions.pop(name, None)

    async def report_load(self, gateway_id: str, ongoing: dict[str, float]) -> None:
        """A gateway's ongoing requests per deployment; a request held for a deployment without ready
        replicas wakes its reconciler at once (scale from zero)."""
        if not gateway_id or len(gateway_id) > _MAX_GATEWAY_ID or not gateway_id.isprintable():
            raise InvalidArgument.field("gateway_id", f"must be 1-{_MAX_GATEWAY_ID} printable characters")
        for name, value in ongoing.items():
            if not math.isfinite(value) or value < 0:
                raise InvalidArgument.field(f"ongoing[{name!r}]", f"must be a finite number >= 0, got {value!r}")
        self._autoscaler.report(gateway_id, ongoing, self._clock())
        for name, value in ongoing.items():
            reconciler = self._reconcilers.get(name)
            if reconciler is not None and value > 0 and not reconciler.ready():
                reconciler.wake()

    async def watch_endpoints(self, name: str = "") -> AsyncGenerator[Snapshot, None]:
        """Every deployment's endpoints (or ``name``'s) now, then after every change."""
        if name:
            names.check_name(name, "name")
        last: Snapshot | None = None
        while True:
            if self._closing:
                raise Unavailable("the scheduler is shutting down", reason="SHUTTING_DOWN")
            changed = self._changed
            snapshot = self.snapshot(name)
            if snapshot != last:
                last = snapshot
                yield snapshot
            await changed.wait()

    def snapshot(self, name: str = "") -> Snapshot:
        """The endpoints of every live deployment (or of ``name``), by name."""
        items = []
        for key in sorted(self._reconcilers):
            if name and key != name:
                continue
            reconciler = self._reconcilers[key]
            d = reconciler.deployment
            ready = reconciler.ready()
            endpoints = () if reconciler.deleting else tuple(Endpoint(r.id, r.address, r.version) for r in ready)
            served = sorted({d.version, *([d.canary_version] if d.canary else []), *(e.version for e in endpoints)})
            items.append(
                DeploymentEndpoints(
                    name=d.name,
                    state=DeploymentState.DELETING if reconciler.deleting else d.state,
                    default_version=d.version,
                    canary_version=d.canary_version,
                    canary_weight_percent=d.spec.canary.weight_percent if d.spec.canary else 0,
                    versions=tuple(
                        ServedVersion(reconciler.versions[v], d.spec.batching)
                        for v in served
                        if v in reconciler.versions
                    ),
                    endpoints=endpoints,
                    target_replicas=reconciler.target,
                    max_replicas=d.spec.replica_bounds[1],
                    tenant=d.tenant,
                )
            )
        return tuple(items)

    def get_reconciler(self, name: str) -> Reconciler:
        reconciler = self._reconcilers.get(name)
        if reconciler is None:
            raise deployment_not_found(name)
        return reconciler
