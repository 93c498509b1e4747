"""Tenants, quotas, usage and scheduler events between protobuf and the domain (``core.policy``,
``core.events``)."""

from __future__ import annotations

import math

from maas.scheduler.v1 import scheduler_pb2 as pb

from services.scheduler.api.convert import timestamp
from services.scheduler.core.events import SchedulerEvent
from services.scheduler.core.policy import NONE, UNLIMITED, Resources, Tenant

_FIELDS = ("cpus", "gpus", "memory_bytes", "jobs", "replicas")


def quota_from_pb(message: pb.Quota) -> Resources:
    """Unset fields have no limit."""
    return Resources(
        **{name: float(getattr(message, name)) if message.HasField(name) else math.inf for name in _FIELDS}
    )


def quota_to_pb(resources: Resources) -> pb.Quota:
    message = pb.Quota()
    for name in _FIELDS:
        value = getattr(resources, name)
        if math.isfinite(value):
            setattr(message, name, value if name in ("cpus", "gpus") else int(value))
    return message


def tenant_from_pb(message: pb.Tenant) -> Tenant:
    return Tenant(
        name=message.name,
        quota=quota_from_pb(message.quota) if message.HasField("quota") else UNLIMITED,
        borrowing_limit=quota_from_pb(message.borrowing_limit) if message.HasField("borrowing_limit") else NONE,
        priority_classes=tuple(message.priority_classes),
    )


def tenant_to_pb(tenant: Tenant) -> pb.Tenant:
    message = pb.Tenant(
        name=tenant.name,
        quota=quota_to_pb(tenant.quota),
        priority_classes=list(tenant.priority_classes),
    )
    if tenant.borrowing_limit != NONE:
        message.borrowing_limit.CopyFrom(quota_to_pb(tenant.borrowing_limit))
    if tenant.create_time is not None:
        message.create_time.CopyFrom(timestamp(tenant.create_time))
    if tenant.update_time is not None:
        message.update_time.CopyFrom(timestamp(tenant.update_time))
    return message


def event_to_pb(event: SchedulerEvent) -> pb.SchedulerEvent:
    return pb.SchedulerEvent(
        sequence=event.sequence,
        time=timestamp(event.time),
        kind=pb.SchedulerEventKind.Value(event.kind.value),
        tenant=event.tenant,
        job_id=event.job_id,
        deployment=event.deployment,
        reason=event.reason,
        target_replicas=event.target_replicas,
    )
