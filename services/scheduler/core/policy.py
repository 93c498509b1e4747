"""The scheduler's policy: tenants' quotas, borrowing, fair ordering and admission, as pure functions.

Nothing here does I/O or reads a clock of its own: :func:`plan_admission` takes the queue, the tenants, what
each tenant has placed now and the pool's capacity, and says which jobs to admit and why each other one
waits. The job service calls it on every admission pass; the unit tests call it with a fake pool and an
injected clock.

The model follows Kueue's cohorts, for training and serving alike:

- A tenant has a *nominal quota* per resource (CPUs, GPUs, memory, running jobs, inference replicas) and a
  *borrowing limit*: beyond its quota it may use capacity other tenants leave idle, up to that limit.
- *Usage* is what is really placed: a job's whole gang (every worker and shard), every replica of every
  deployment.
- The queue is ordered by priority (descending); among equal priorities, the tenant with the least decayed
  recent usage (relative to its quota) goes first, so a burst of one tenant cannot starve the others; then
  submission order.
- Admission is all or nothing per gang, and in order: a job that does not fit the pool holds back every job
  after it (a large job is never starved by smaller ones slipping past), while a job held by its own
  tenant's quota holds back nobody else.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from typing import Any

from shared.errors import FailedPrecondition

_EPSILON = 1e-9
_DIMENSIONS = ("cpus", "gpus", "memory_bytes", "jobs", "replicas")
# Names of the dimensions as users read them.
_LABELS = {
    "cpus": "CPUs",
    "gpus": "GPUs",
    "memory_bytes": "bytes of memory",
    "jobs": "running jobs",
    "replicas": "replicas",
}


@dataclass(frozen=True)
class Resources:
    """An amount of each resource the policy counts (``math.inf``: no limit)."""

    cpus: float = 0.0
    gpus: float = 0.0
    memory_bytes: float = 0.0
    jobs: float = 0.0
    replicas: float = 0.0

    # Spelled out, not looped over fields(): an admission pass does these per queued job, and the generic
    # form cost more than the rest of the pass.
    def __add__(self, other: Resources) -> Resources:
        return Resources(
            self.cpus + other.cpus,
            self.gpus + other.gpus,
            self.memory_bytes + other.memory_bytes,
            self.jobs + other.jobs,
            self.replicas + other.replicas,
        )

    def __sub__(self, other: Resources) -> Resources:
        return Resources(
            self.cpus - other.cpus,
            self.gpus - other.gpus,
            self.memory_bytes - other.memory_bytes,
            self.jobs - other.jobs,
            self.replicas - other.replicas,
        )

    def scaled(self, factor: float) -> Resources:
        return Resources(
            self.cpus * factor,
            self.gpus * factor,
            self.memory_bytes * factor,
            self.jobs * factor,
            self.replicas * factor,
        )

    def over(self, limit: Resources) -> list[str]:
        """The dimensions in which this exceeds ``limit``."""
        return [name for name in _DIMENSIONS if getattr(self, name) > getattr(limit, name) + _EPSILON]

    def to_dict(self) -> dict[str, float | None]:
        """JSON-ready: an unlimited dimension is None."""
        return {f.name: (None if math.isinf(v := getattr(self, f.name)) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Resources:
        return cls(**{f.name: math.inf if data.get(f.name) is None else float(data[f.name]) for f in fields(cls)})

    def describe(self, names: Iterable[str]) -> str:
        return ", ".join(f"{_amount(getattr(self, n))} {_LABELS[n]}" for n in names)


UNLIMITED = Resources(math.inf, math.inf, math.inf, math.inf, math.inf)
NONE = Resources()


def _amount(value: float) -> str:
    if math.isinf(value):
        return "unlimited"
    return f"{value:g}"


@dataclass(frozen=True)
class Tenant:
    """A tenant's quota: ``quota`` it is entitled to, plus up to ``borrowing_limit`` of others' idle capacity;
    ``priority_classes`` it may use beyond the ones every tenant may."""

    name: str
    quota: Resources = UNLIMITED
    borrowing_limit: Resources = NONE
    priority_classes: tuple[str, ...] = ()
    create_time: datetime | None = None
    update_time: datetime | None = None

    @property
    def ceiling(self) -> Resources:
        """The most it may hold at once: its quota plus its borrowing limit."""
        return self.quota + self.borrowing_limit

    def weight(self) -> float:
        """Its fair-share weight: its CPU quota (1 when unlimited or none)."""
        cpus = self.quota.cpus
        return cpus if math.isfinite(cpus) and cpus > 0 else 1.0


def validate_quota(resources: Resources, what: str) -> list[tuple[str, str]]:
    """Violations (field, message) of a quota or borrowing limit: every dimension >= 0 (or unlimited)."""
    return [
        (f"{what}.{f.name}", f"must be >= 0, got {getattr(resources, f.name)!r}")
        for f in fields(resources)
        if math.isnan(getattr(resources, f.name)) or getattr(resources, f.name) < 0
    ]


def gang_demand(members: Iterable[tuple[int, float, float, float]]) -> Resources:
    """What a job's gang holds once placed: (count, CPUs, GPUs, memory) per kind of member. A member
    asking for no CPUs is placed with one (``adapters.ray_gang``), so it counts one."""
    total = NONE
    for count, cpus, gpus, memory in members:
        total = total + Resources(cpus=cpus or 1.0, gpus=gpus, memory_bytes=memory).scaled(count)
    return replace(total, jobs=1)


def replica_demand(count: int, cpus: float, gpus: float, memory: float) -> Resources:
    """What ``count`` inference replicas hold."""
    return Resources(cpus=cpus * count, gpus=gpus * count, memory_bytes=memory * count, replicas=count)


@dataclass(frozen=True)
class Candidate:
    """A queued job as the policy sees it: what its whole gang needs, once placed."""

    id: str
    tenant: str
    priority: int
    seq: int
    demand: Resources


@dataclass
class Plan:
    """What one admission pass decided: jobs to admit (in order), why each other one waits, and the first
    job that waits only because the pool is full (what preemption may make room for)."""

    admit: list[Candidate] = field(default_factory=list)
    waiting: dict[str, str] = field(default_factory=dict)
    blocked: Candidate | None = None


class FairShare:
    """Each tenant's recent usage, exponentially decayed (half-life ``half_life_s``): the fair ordering key.

    ``observe`` integrates the CPUs (and GPUs, weighted heavier) a tenant holds over time; what it held an
    hour ago counts little, what it holds now counts fully.
    """

    def __init__(self, half_life_s: float, clock: Callable[[], float]) -> None:
        self._half_life = half_life_s
        self._clock = clock
        self._last = clock()
        self._usage: dict[str, float] = {}

    def observe(self, usage: Mapping[str, Resources]) -> None:
        now = self._clock()
        elapsed = max(now - self._last, 0.0)
        self._last = now
        decay = 0.5 ** (elapsed / self._half_life) if self._half_life > 0 else 0.0
        for tenant in set(self._usage) | set(usage):
            held = usage.get(tenant, NONE)
            self._usage[tenant] = self._usage.get(tenant, 0.0) * decay + (held.cpus + 10 * held.gpus) * elapsed

    def share(self, tenant: Tenant) -> float:
        return self._usage.get(tenant.name, 0.0) / tenant.weight()


def plan_admission(
    queue: Sequence[Candidate],
    tenants: Callable[[str], Tenant],
    usage: Mapping[str, Resources],
    capacity: Resources,
    share: Callable[[Tenant], float],
) -> Plan:
    """Which queued jobs to admit now, in order, and why the others wait.

    Args:
        queue: The QUEUED jobs (any order).
        tenants: A tenant by name (a tenant without a record gets the default quota).
        usage: What each tenant has placed now (jobs and replicas).
        capacity: The pool's total (its ``jobs`` dimension: the scheduler's cap on running jobs).
        share: A tenant's decayed recent usage (:meth:`FairShare.share`).
    """
    plan = Plan()
    held = dict(usage)
    total = sum(held.values(), NONE)
    pending: dict[str, deque[Candidate]] = {}
    for job in sorted(queue, key=lambda j: (-j.priority, j.seq)):
        pending.setdefault(job.tenant, deque()).append(job)
    # Looked up once per pass: the loop below orders the tenants once per queued job.
    records = {name: tenants(name) for name in pending}
    shares = {name: share(record) for name, record in records.items()}
    blocked_by: Candidate | None = None
    while pending:
        # The next job: highest priority, then the tenant with the least recent usage, then oldest.
        def order(name: str) -> tuple[int, float, int]:
            head = pending[name][0]
            # What it was just granted in this pass counts too, so one pass spreads among tenants.
            granted = held.get(name, NONE).cpus - usage.get(name, NONE).cpus
            return (-head.priority, shares[name] + granted / records[name].weight(), head.seq)

        name = min(pending, key=order)
        job = pending[name].popleft()
        if not pending[name]:
            del pending[name]
        if blocked_by is not None:
            plan.waiting[job.id] = (
                f"waiting behind job {blocked_by.id}, which is first in the queue and does not fit yet"
            )
            continue
        tenant = records[name]
        after = held.get(name, NONE) + job.demand
        over_ceiling = after.over(tenant.ceiling)
        if over_ceiling:
            plan.waiting[job.id] = _quota_reason(tenant, held.get(name, NONE), job.demand, over_ceiling)
            continue
        over_pool = (total + job.demand).over(capacity)
        if over_pool:
            plan.waiting[job.id] = (
                f"the pool is full: {total.describe(over_pool)} in use of {capacity.describe(over_pool)}; "
                f"the job needs {job.demand.describe(over_pool)}"
            )
            blocked_by = plan.blocked = job
            continue
        held[name] = after
        total = total + job.demand
        plan.admit.append(job)
    return plan


def choose_victims(
    head: Candidate,
    running: Sequence[Candidate],
    tenants: Callable[[str], Tenant],
    usage: Mapping[str, Resources],
    capacity: Resources,
) -> list[Candidate]:
    """The running jobs to preempt so that ``head`` (blocked by a full pool) fits; [] when it cannot be done.

    A job may be preempted for ``head`` when it has a lower priority, or when ``head``'s tenant asks for no
    more than its nominal quota and the job's tenant holds more than its own (borrowed capacity is
    reclaimed first, whatever its priority). Borrowers go first, then the lowest priorities, then the most
    recently submitted; no more are taken than needed.
    """
    total = sum(usage.values(), NONE)
    owner = tenants(head.tenant)
    within_quota = not (usage.get(head.tenant, NONE) + head.demand).over(owner.quota)

    def borrowing(job: Candidate) -> bool:
        return bool(usage.get(job.tenant, NONE).over(tenants(job.tenant).quota))

    eligible = [
        job
        for job in running
        if job.priority < head.priority or (within_quota and job.tenant != head.tenant and borrowing(job))
    ]
    victims: list[Candidate] = []
    freed = NONE
    for job in sorted(eligible, key=lambda j: (not borrowing(j), j.priority, -j.seq)):
        if not (total - freed + head.demand).over(capacity):
            break
        victims.append(job)
        freed = freed + job.demand
    return victims if not (total - freed + head.demand).over(capacity) else []


def admit_one(tenant: Tenant, usage: Mapping[str, Resources], capacity: Resources, demand: Resources) -> str | None:
    """Whether ``demand`` (one more inference replica) fits ``tenant``'s quota plus borrowing and the pool:
    None, or why not."""
    held = usage.get(tenant.name, NONE)
    over = (held + demand).over(tenant.ceiling)
    if over:
        return _quota_reason(tenant, held, demand, over)
    total = sum(usage.values(), NONE)
    over_pool = (total + demand).over(capacity)
    if over_pool:
        return f"the pool is full: {total.describe(over_pool)} in use of {capacity.describe(over_pool)}"
    return None


def _quota_reason(tenant: Tenant, used: Resources, demand: Resources, over: list[str]) -> str:
    borrowing = (
        "" if tenant.borrowing_limit == NONE else f" plus its borrowing limit ({tenant.borrowing_limit.describe(over)})"
    )
    return (
        f"tenant {tenant.name!r} is at its quota: {used.describe(over)} in use of "
        f"{tenant.quota.describe(over)}{borrowing}; {'the job' if demand.jobs else 'a replica'} needs "
        f"{demand.describe(over)}"
    )


def check_feasible(demand: Resources, tenant: Tenant, capacity: Resources, what: str = "the job") -> None:
    """Refuse at submission what could never be admitted, instead of queueing it forever.

    Raises:
        FailedPrecondition: ``demand`` exceeds the whole pool, or the tenant's quota plus borrowing limit.
    """
    over_pool = demand.over(capacity)
    if over_pool:
        raise FailedPrecondition(
            f"{what} needs {demand.describe(over_pool)}; the whole pool has {capacity.describe(over_pool)}",
            reason="LARGER_THAN_POOL",
        )
    over_quota = demand.over(tenant.ceiling)
    if over_quota:
        raise FailedPrecondition(
            f"{what} needs {demand.describe(over_quota)}; tenant {tenant.name!r} may hold at most "
            f"{tenant.ceiling.describe(over_quota)} (its quota plus its borrowing limit)",
            reason="LARGER_THAN_QUOTA",
        )


def with_quota(tenant: Tenant, quota: Resources | None, borrowing_limit: Resources | None) -> Tenant:
    return replace(
        tenant,
        quota=tenant.quota if quota is None else quota,
        borrowing_limit=tenant.borrowing_limit if borrowing_limit is None else borrowing_limit,
    )
