"""The interfaces the deployment core depends on: its store, the replica pool (Ray) and the model resolver
(the registry).

:class:`DeploymentRepository` implementations are synchronous (the core runs them in threads); the pool and
the resolver are async.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from services.scheduler.core.deployments.model import Batching, Deployment, ResolvedVersion
from services.scheduler.core.jobs.model import ResourceRequest


class DeploymentRepository(Protocol):
    """Deployment storage. Every method is one transaction."""

    def insert(self, deployment: Deployment) -> Deployment:
        """Store a new deployment; AlreadyExists if one has its name."""
        ...

    def insert_or_get(self, deployment: Deployment) -> tuple[Deployment, bool]:
        """Store a new deployment and return it with True; but when its tenant already has one with its
        non-empty ``request_id`` (stored before, or by a concurrent call: the store's unique index
        decides), store nothing and return that one with False. AlreadyExists if another has its name."""
        ...

    def by_request_id(self, tenant: str, request_id: str) -> Deployment | None:
        """The deployment of ``tenant`` created with ``request_id``, if there is one."""
        ...

    def get(self, name: str) -> Deployment:
        """The deployment; NotFound if there is none."""
        ...

    def list_deployments(self, after: str | None, limit: int, tenant: str | None = None) -> list[Deployment]:
        """Deployments by name, after ``after``, of ``tenant`` (None: every tenant)."""
        ...

    def all(self) -> list[Deployment]: ...

    def save(self, deployment: Deployment) -> Deployment:
        """Replace the stored deployment (spec, state, message, versions, generation, target); stamps
        ``update_time``. NotFound if it was deleted."""
        ...

    def delete(self, name: str) -> None:
        """Remove it (a no-op if it is gone)."""
        ...


@dataclass(frozen=True)
class ReplicaSpec:
    """What one replica runs: a version of a model with its batching, on these resources."""

    replica_id: str
    model: str
    version: int
    batching: Batching
    resources: ResourceRequest
    require_signature: bool = False


@dataclass(frozen=True)
class FoundReplica:
    """A replica a previous scheduler process left: its id and address (empty: not serving)."""

    replica_id: str
    address: str


class ReplicaHealth(enum.Enum):
    OK = "ok"
    #: Did not answer in time (counted; two in a row make it dead).
    UNRESPONSIVE = "unresponsive"
    #: Gone (its process died): replaced at once.
    DEAD = "dead"


class ReplicaPool(Protocol):
    """Runs replicas (Ray actors hosting an inference worker, in production)."""

    async def start(self, spec: ReplicaSpec, timeout_s: float) -> str:
        """Start the replica, load and warm up its model; returns its ``host:port`` once it serves.
        Raises on failure (the message says why); leaves nothing behind then."""
        ...

    async def stop(self, replica_id: str, grace_s: float) -> None:
        """Let in-flight requests finish (up to ``grace_s``), then remove the replica. Never raises."""
        ...

    async def ping(self, replica_id: str, timeout_s: float) -> ReplicaHealth: ...

    async def find(self) -> list[FoundReplica]:
        """Every replica that exists now (left by a previous process, too)."""
        ...


class ModelResolver(Protocol):
    """Resolves a model and a version (number, alias or empty: the latest) in the registry."""

    async def resolve(self, model: str, version: str, tenant: str) -> ResolvedVersion:
        """Resolve as ``tenant`` sees the registry (the deployment's tenant: a deployment serves its own
        tenant's models only). NotFound if the model or version does not exist, or is another tenant's."""
        ...

    async def signature_problem(self, model: str, version: int, tenant: str) -> str:
        """Why no signature of the version counts under ``tenant``'s trust policy, from the registry's
        records ("the version is not signed", untrusted keys); empty when a trusted key signed it."""
        ...
