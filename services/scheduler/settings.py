"""The scheduler's settings (environment variables ``MAAS_SCHEDULER_*``, ``MAAS_RAY_*`` plus the common ``MAAS_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field

from shared.settings import CommonSettings


class SchedulerSettings(CommonSettings):
    """Settings of the scheduler service."""

    scheduler_address: str = Field("127.0.0.1:7002", description="host:port the scheduler's gRPC server binds.")
    scheduler_internal_address: str | None = Field(
        None,
        description="host:port of a second listener requiring client certificates from the mesh's CA (mutual "
        "TLS), where the gateway calls; `maas up` sets 127.0.0.1:7012. None: no such listener.",
    )
    scheduler_metrics_address: str = Field(
        "127.0.0.1:9003", description="host:port of the Prometheus metrics endpoint (port 0 picks one)."
    )
    scheduler_database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the job store (sqlite:///... or postgresql+psycopg://...); default: SQLite "
        "under MAAS_HOME/scheduler.",
    )
    scheduler_registry_address: str = Field(
        "127.0.0.1:7001", description="host:port of the registry that receives trained models."
    )
    scheduler_data_root: Path | None = Field(
        None,
        description="Directory that dataset files (dataset 'file', option 'path') are relative to and must stay "
        "inside; default: MAAS_HOME/data.",
    )
    scheduler_checkpoint_root: Path | None = Field(
        None,
        description="Directory of training checkpoints (shared storage on a cluster); default: MAAS_HOME/checkpoints.",
    )
    scheduler_max_running_jobs: int = Field(
        1, ge=0, description="Jobs placed or running at once; 0 pauses admission (queued jobs wait)."
    )
    scheduler_tenant_max_running: int = Field(
        0,
        ge=0,
        description="Jobs a tenant without a quota record may have placed or running at once; 0: no limit (its "
        "other resources are unlimited too). A tenant's record (CreateTenant) sets its own.",
    )
    scheduler_priority_classes: dict[str, int] = Field(
        default_factory=lambda: {"low": -100, "normal": 0, "high": 100},
        description="Priority classes (name -> priority; higher is admitted first) jobs name in "
        'spec.priority_class. A JSON object, e.g. \'{"batch": -10, "normal": 0, "urgent": 50}\'.',
    )
    scheduler_default_priority_class: str = Field(
        "normal",
        description="The class of a job that names none; it and the classes below it are open to every tenant, "
        "higher ones only to tenants granted them (UpdateQuota).",
    )
    scheduler_fair_share_half_life_s: float = Field(
        600.0,
        gt=0,
        description="Half-life of the recent usage that orders tenants of equal priority (least used first).",
    )
    scheduler_preemption: bool = Field(
        True,
        description="Preempt lower-priority jobs (and jobs on borrowed capacity) when a job that fits its "
        "tenant's quota cannot be placed; preempted jobs are checkpointed and resume later.",
    )
    scheduler_preemption_grace_s: float = Field(
        30.0, gt=0, description="How long a preempted job's shards get to write their checkpoints."
    )
    ray_address: str | None = Field(
        None,
        # Ray's own variable works too (every Ray tool reads it); MAAS_RAY_ADDRESS wins when both are set.
        validation_alias=AliasChoices("MAAS_RAY_ADDRESS", "RAY_ADDRESS", "ray_address"),
        description="Address of the Ray cluster to run jobs and replicas on (ray://host:10001 or auto; Ray's own "
        "RAY_ADDRESS is read too); unset: a local Ray.",
    )
    ray_num_cpus: int = Field(
        8,
        ge=1,
        description="Logical CPUs declared for a local Ray (not used with ray_address); may exceed the cores: "
        "a job's workers and shards are placed as one gang, which must fit.",
    )
    scheduler_placement_timeout_s: float = Field(
        60.0, gt=0, description="How long a job's workers and shards may wait for resources before it is requeued."
    )
    scheduler_admission_min_interval_s: float = Field(
        0.05,
        ge=0,
        le=5,
        description="Least time between two admission passes under a burst of submissions (a pass orders the "
        "whole queue: one per submission made a burst quadratic). A submission after a quiet spell is "
        "admitted at once.",
    )
    scheduler_max_placement_attempts: int = Field(
        3,
        ge=1,
        description="Placement timeouts in a row after which a job fails (naming what the cluster lacks) "
        "instead of being requeued again; the count restarts when the job runs.",
    )
    scheduler_default_max_failures: int = Field(
        3, ge=0, description="Worker or shard failures a job tolerates when its spec sets max_failures to 0."
    )

    scheduler_replica_default_cpus: float = Field(
        1.0, gt=0, description="Logical CPUs of an inference replica whose deployment asks for none."
    )
    scheduler_replica_health_interval_s: float = Field(
        1.0, gt=0, description="How often every inference replica is pinged; two missed pings replace it."
    )
    scheduler_replica_ping_timeout_s: float = Field(
        5.0, gt=0, description="How long one replica ping may take before it counts as missed."
    )
    scheduler_replica_drain_delay_s: float = Field(
        1.0,
        ge=0,
        description="How long a replica taken out of the endpoints keeps serving before it is stopped, so "
        "gateways see the new endpoints first.",
    )
    scheduler_replica_stop_grace_s: float = Field(
        10.0, ge=0, description="Seconds a stopping replica's in-flight requests get to finish."
    )
    scheduler_replica_start_timeout_s: float = Field(
        120.0,
        gt=0,
        description="How long a replica may take to start (placement, model download, load and warm-up) "
        "before the start counts as failed.",
    )
    scheduler_replica_torch_threads: int = Field(
        1, ge=1, description="torch threads of each inference replica (1: safest beside other busy processes)."
    )

    def database_url(self) -> str:
        if self.scheduler_database_url:
            return self.scheduler_database_url
        return f"sqlite:///{(self.home / 'scheduler' / 'scheduler.db').resolve()}"

    def data_root(self) -> Path:
        return self.scheduler_data_root or self.home / "data"

    def checkpoint_root(self) -> Path:
        return self.scheduler_checkpoint_root or self.home / "checkpoints"
