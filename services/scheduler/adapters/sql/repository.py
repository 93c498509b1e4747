"""The scheduler's JobRepository on SQLAlchemy Core: SQLite and PostgreSQL through the same statements."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from services.scheduler.adapters.sql.tables import jobs
from services.scheduler.core.jobs.model import (
    ACTIVE_STATES,
    LIVE_STATES,
    Job,
    JobChanges,
    JobState,
    TrainingJobSpec,
    job_not_found,
)


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything stored is UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _metrics_out(metrics: dict[str, float]) -> dict[str, float | str]:
    # JSON has no NaN or infinity (PostgreSQL refuses them): those are stored as their names.
    return {name: value if math.isfinite(value) else str(value) for name, value in metrics.items()}


def _metrics_in(stored: dict[str, float | str]) -> dict[str, float]:
    return {name: float(value) for name, value in stored.items()}


def _to_job(row: sa.Row[Any]) -> Job:
    return Job(
        id=row.id,
        spec=TrainingJobSpec.from_dict(row.spec),
        state=JobState(row.state),
        message=row.message,
        step=row.step,
        total_steps=row.total_steps,
        metrics=_metrics_in(row.metrics),
        model_version=row.model_version,
        dataset_fingerprint=row.dataset_fingerprint,
        failures=row.failures,
        revision=row.revision,
        preemptions=row.preemptions,
        create_time=_utc(row.created_at),
        update_time=_utc(row.updated_at),
        request_id=row.request_id or "",
        placement_attempts=row.placement_attempts,
        trace_context=row.trace_context or "",
    )


class SqlJobRepository:
    """Implements ``core.ports.JobRepository``; each method is one transaction."""

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine

    def _read(self) -> sa.Connection:
        # Marked so that SQLite starts a plain deferred transaction, not a write-locking one.
        return self._engine.connect().execution_options(maas_readonly=True)

    @staticmethod
    def _row(conn: sa.Connection, job_id: str, *, lock: bool = False) -> sa.Row[Any]:
        query = sa.select(jobs).where(jobs.c.id == job_id)
        if lock:
            query = query.with_for_update()
        row = conn.execute(query).first()
        if row is None:
            raise job_not_found(job_id)
        return row

    @staticmethod
    def _values(job: Job) -> dict[str, Any]:
        return {
            "id": job.id,
            "tenant": job.spec.tenant,
            "state": job.state.value,
            "priority": job.spec.priority,
            "spec": job.spec.to_dict(),
            "message": job.message,
            "step": job.step,
            "total_steps": job.total_steps,
            "metrics": _metrics_out(job.metrics),
            "model_version": job.model_version,
            "dataset_fingerprint": job.dataset_fingerprint,
            "failures": job.failures,
            "revision": job.revision,
            "created_at": job.create_time,
            "updated_at": job.update_time,
            "request_id": job.request_id or None,
            "placement_attempts": job.placement_attempts,
            "trace_context": job.trace_context or None,
        }

    def insert(self, job: Job) -> Job:
        with self._engine.begin() as conn:
            conn.execute(jobs.insert().values(**self._values(job)))
            return _to_job(self._row(conn, job.id))

    def insert_many(self, batch: Sequence[Job]) -> list[tuple[Job, bool] | Exception]:
        try:
            return list(self._insert_many(batch))
        except sa.exc.IntegrityError:
            # Another process stored one of these request ids between our read and our insert (or an id
            # collided): the whole transaction is gone, so each job is stored on its own, where the unique
            # index decides for that one alone, and only the job at fault gets the error.
            results: list[tuple[Job, bool] | Exception] = []
            for job in batch:
                try:
                    results.append(self.insert_or_get(job))
                except sa.exc.IntegrityError as exc:
                    results.append(exc)
            return results

    def _insert_many(self, batch: Sequence[Job]) -> list[tuple[Job, bool]]:
        keys = {(job.spec.tenant, job.request_id) for job in batch if job.request_id}
        results: list[tuple[Job, bool]] = []
        with self._engine.begin() as conn:
            # The write transaction (SQLite: BEGIN IMMEDIATE) is open, so no other writer in this database
            # adds a request id between this read and the insert; on PostgreSQL the unique index still
            # decides, and insert_many falls back to one transaction per job.
            known: dict[tuple[str, str], Job] = {}
            if keys:
                tenants = sorted({tenant for tenant, _ in keys})
                request_ids = sorted({request_id for _, request_id in keys})
                query = sa.select(jobs).where(jobs.c.tenant.in_(tenants), jobs.c.request_id.in_(request_ids))
                for row in conn.execute(query).all():
                    if (row.tenant, row.request_id) in keys:
                        known[(row.tenant, row.request_id)] = _to_job(row)
            rows: list[dict[str, Any]] = []
            for job in batch:
                key = (job.spec.tenant, job.request_id)
                if job.request_id and key in known:
                    results.append((known[key], False))  # a retry, maybe of a job earlier in this batch
                    continue
                rows.append(self._values(job))
                results.append((job, True))
                if job.request_id:
                    known[key] = job
            if rows:
                conn.execute(jobs.insert(), rows)
        return results

    def insert_or_get(self, job: Job) -> tuple[Job, bool]:
        try:
            return self.insert(job), True
        except sa.exc.IntegrityError:
            # The unique index on (tenant, request_id) decides between racing submissions; the loser's
            # transaction is gone, so the winner's row is read in a new one.
            if not job.request_id:
                raise
            existing = self._by_request_id(job.spec.tenant, job.request_id)
            if existing is None:
                raise  # another constraint (an id collision): not an idempotent retry
            return existing, False

    def _by_request_id(self, tenant: str, request_id: str) -> Job | None:
        query = sa.select(jobs).where(jobs.c.tenant == tenant, jobs.c.request_id == request_id)
        with self._read() as conn:
            row = conn.execute(query).first()
        return _to_job(row) if row is not None else None

    def get(self, job_id: str) -> Job:
        with self._read() as conn:
            return _to_job(self._row(conn, job_id))

    def list_jobs(self, states: frozenset[JobState], tenant: str, after: str | None, limit: int) -> list[Job]:
        query = sa.select(jobs).order_by(jobs.c.seq.desc()).limit(limit)
        if states:
            query = query.where(jobs.c.state.in_(sorted(s.value for s in states)))
        if tenant:
            query = query.where(jobs.c.tenant == tenant)
        if after is not None:
            # A token's job always exists (jobs are never deleted); an unknown one yields nothing.
            query = query.where(jobs.c.seq < sa.select(jobs.c.seq).where(jobs.c.id == after).scalar_subquery())
        with self._read() as conn:
            return [_to_job(row) for row in conn.execute(query).all()]

    def update(self, job_id: str, changes: JobChanges, only_from: frozenset[JobState] | None = None) -> Job | None:
        with self._engine.begin() as conn:
            row = self._row(conn, job_id, lock=True)
            if only_from is not None and JobState(row.state) not in only_from:
                return None
            values: dict[str, Any] = {"revision": row.revision + 1, "updated_at": _now()}
            if changes.state is not None:
                values["state"] = changes.state.value
            if changes.message is not None:
                values["message"] = changes.message
            if changes.step is not None:
                values["step"] = changes.step
            if changes.metrics is not None:
                values["metrics"] = _metrics_out(changes.metrics)
            if changes.model_version is not None:
                values["model_version"] = changes.model_version
            if changes.preempted:
                values["preemptions"] = row.preemptions + 1
            if changes.placement_attempts is not None:
                values["placement_attempts"] = changes.placement_attempts
            conn.execute(jobs.update().where(jobs.c.seq == row.seq).values(**values))
            return _to_job(self._row(conn, job_id))

    def add_failure(self, job_id: str, reason: str) -> Job:
        with self._engine.begin() as conn:
            row = self._row(conn, job_id, lock=True)
            if JobState(row.state) in LIVE_STATES:
                conn.execute(
                    jobs.update()
                    .where(jobs.c.seq == row.seq)
                    .values(failures=row.failures + 1, message=reason, revision=row.revision + 1, updated_at=_now())
                )
            return _to_job(self._row(conn, job_id))

    def in_states(self, states: frozenset[JobState]) -> list[Job]:
        query = sa.select(jobs).where(jobs.c.state.in_(sorted(s.value for s in states))).order_by(jobs.c.seq)
        with self._read() as conn:
            return [_to_job(row) for row in conn.execute(query).all()]

    def revisions_in_states(self, states: frozenset[JobState]) -> list[tuple[str, int]]:
        query = (
            sa.select(jobs.c.id, jobs.c.revision)
            .where(jobs.c.state.in_(sorted(s.value for s in states)))
            .order_by(jobs.c.seq)
        )
        with self._read() as conn:
            return [(row.id, row.revision) for row in conn.execute(query).all()]

    def get_many(self, job_ids: Sequence[str]) -> list[Job]:
        found: list[Job] = []
        with self._read() as conn:
            # Bounded IN lists: SQLite's limit on bound parameters, and PostgreSQL's planner, like them short.
            for start in range(0, len(job_ids), 500):
                query = sa.select(jobs).where(jobs.c.id.in_(job_ids[start : start + 500]))
                found.extend(_to_job(row) for row in conn.execute(query).all())
        return found

    def active_counts(self) -> dict[str, int]:
        query = (
            sa.select(jobs.c.tenant, sa.func.count())
            .where(jobs.c.state.in_(sorted(s.value for s in ACTIVE_STATES)))
            .group_by(jobs.c.tenant)
        )
        with self._read() as conn:
            return {tenant: int(count) for tenant, count in conn.execute(query).all()}
