"""The interfaces the scheduler's core depends on, and the one it offers runners.

:class:`JobRepository` implementations are synchronous; the core runs them in threads. :class:`JobRunner`
is what actually places and runs a job (on Ray, in production); it talks back through the
:class:`JobReporter` the core hands it, which :class:`~services.scheduler.core.jobs.service.JobService` implements.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from services.scheduler.core.jobs.model import Job, JobChanges, JobState, StepMetrics
from services.scheduler.core.policy import Candidate, Tenant


class JobRepository(Protocol):
    """Job storage. Every method is one transaction."""

    def insert(self, job: Job) -> Job: ...
    def insert_or_get(self, job: Job) -> tuple[Job, bool]:
        """Store ``job`` and return it with True; but when its tenant already has a job with its non-empty
        ``request_id`` (stored before, or by a concurrent call: the store's unique index decides), store
        nothing and return that job with False."""
        ...

    def insert_many(self, batch: Sequence[Job]) -> list[tuple[Job, bool] | Exception]:
        """``insert_or_get`` for each job of ``batch``, in one transaction where it can (group commit): a
        request id repeated within the batch gives the first job of it. A job the store refuses gets its
        error in its place; the others are stored all the same."""
        ...

    def get(self, job_id: str) -> Job:
        """The job; NotFound if there is none."""
        ...

    def list_jobs(self, states: frozenset[JobState], tenant: str, after: str | None, limit: int) -> list[Job]:
        """Jobs newest first (by submission order), after the job ``after``, in ``states`` (empty: any) and of
        ``tenant`` (empty: any)."""
        ...

    def update(self, job_id: str, changes: JobChanges, only_from: frozenset[JobState] | None = None) -> Job | None:
        """Apply ``changes`` (and bump the revision) if the job's state is in ``only_from`` (None: any state).

        Returns the updated job, or None when its state was not in ``only_from`` (nothing changed).
        Raises NotFound if there is no such job.
        """
        ...

    def add_failure(self, job_id: str, reason: str) -> Job:
        """Count one worker or shard failure (``failures + 1``, message ``reason``) whatever the state."""
        ...

    def in_states(self, states: frozenset[JobState]) -> list[Job]:
        """Every job in ``states``, oldest first."""
        ...

    def revisions_in_states(self, states: frozenset[JobState]) -> list[tuple[str, int]]:
        """(id, revision) of every job in ``states``, oldest first: what changed since a read, cheaply."""
        ...

    def get_many(self, job_ids: Sequence[str]) -> list[Job]:
        """The jobs of ``job_ids`` that exist, in no particular order."""
        ...

    def active_counts(self) -> dict[str, int]:
        """Tenant -> how many of its jobs are PLACING or RUNNING (tenants with none are left out)."""
        ...


class JobReporter(Protocol):
    """How a runner tells the scheduler what its job is doing. Every method is safe to call at any time:
    reports about a job that already ended (or is being cancelled) are ignored."""

    async def placing(self, job_id: str) -> None:
        """Workers and shards are being placed (again, after a failure: RUNNING -> PLACING is fine)."""
        ...

    async def running(self, job_id: str) -> None:
        """Every worker and shard is up; training runs."""
        ...

    async def progress(self, job_id: str, metrics: StepMetrics) -> None:
        """One worker finished a step. Cheap: stored at most once a second per job, dropped for slow watchers."""
        ...

    async def succeeded(self, job_id: str, model_version: int, metrics: dict[str, float]) -> None:
        """The trained model is registry version ``model_version``; ``metrics`` are the final ones."""
        ...

    async def failed(self, job_id: str, reason: str) -> None:
        """The job cannot finish; ``reason`` is shown to the user."""
        ...

    async def requeued(self, job_id: str, reason: str) -> None:
        """Back to the queue (e.g. placement timed out): frees the job's running slot; admitted again later."""
        ...

    async def placement_timed_out(self, job_id: str, timeout_s: float, shortage: str) -> None:
        """The gang could not be placed within ``timeout_s``; ``shortage`` says what the cluster lacks
        ("the cluster lacks 3 CPU: ..."). The scheduler requeues the job, or fails it after
        ``max_placement_attempts`` timeouts in a row (a job that runs starts counting again)."""
        ...

    async def failure(self, job_id: str, reason: str) -> int:
        """Count one worker or shard failure; returns the job's count so far. The runner compares it with
        ``job.spec.max_failures`` (already defaulted) and calls :meth:`failed` when it is exceeded."""
        ...


class JobRunner(Protocol):
    """Places and runs jobs (the Ray runner in production). The service creates it lazily, on the first job
    it admits or resumes, through a ``Callable[[], JobRunner]`` factory: keep construction cheap and connect
    (start Ray) on first use. A runner may also have ``async def close(self) -> None``, which the service
    awaits when it closes.
    """

    async def run(self, job: Job, reporter: JobReporter) -> None:
        """Run ``job`` (PLACING, stored already) to its end, reporting through ``reporter``.

        Returns once the job has ended: after reporting succeeded, failed or requeued, or after
        :meth:`cancel` for it. Returning without reporting an outcome fails the job, and so does raising
        (the exception text becomes the job's message). Cancellation (``asyncio.CancelledError``) means
        the scheduler is shutting down: the job stays PLACING/RUNNING in the store and is handed to
        :meth:`resume` at the next start, so leave what can be re-attached to.
        """
        ...

    async def cancel(self, job_id: str) -> None:
        """Stop the job (a no-op for a job this runner does not know). Its run() should return soon;
        whatever it reports afterwards is ignored. Raising leaves the job as it was."""
        ...

    async def resume(self, job: Job, reporter: JobReporter) -> None:
        """Like :meth:`run`, for a job found PLACING or RUNNING at start-up (a previous scheduler process
        placed it): re-attach to it, or restart it from its checkpoints; also for a preempted job admitted
        again (it restarts from the checkpoint its preemption took). The runner decides."""
        ...

    async def preempt(self, job: Job, grace_s: float) -> None:
        """Checkpoint the job's shards (within ``grace_s``), stop its workers and release its gang; its
        run() (if this runner is running it) returns soon, and what it reports afterwards is ignored. Also
        called for a job a previous scheduler process began to preempt: finish it (a gang may be left)."""
        ...

    async def sweep(self, keep: set[str]) -> list[str]:
        """Remove what no stored job accounts for: the actors and placement groups of every job whose id is
        not in ``keep`` (a previous scheduler process left them: killed before it could tear them down, or
        its jobs ended while it was down). Called at start, before any job is resumed. Returns the names of
        what it removed."""
        ...


class TenantRepository(Protocol):
    """Tenants with quotas. Every method is one transaction."""

    def insert(self, tenant: Tenant) -> Tenant:
        """AlreadyExists if a tenant has that name."""
        ...

    def get(self, name: str) -> Tenant | None: ...

    def all(self) -> list[Tenant]:
        """Every tenant, by name."""
        ...

    def update(self, tenant: Tenant) -> Tenant:
        """Replace its quota, borrowing limit and priority classes; NotFound without a record."""
        ...


class ElasticReplicas(Protocol):
    """Inference replicas above their deployments' minimums, which preemption may take for a job
    (``core.deployments.DeploymentService``)."""

    def preemptible(self, priority: int) -> list[Candidate]:
        """Candidates (one per replica, id = replica id) of ``priority``."""
        ...

    def shed(self, replica_ids: list[str], hold_s: float, reason: str) -> None:
        """Give those replicas up, draining first; their deployments stay scaled down for ``hold_s``."""
        ...
