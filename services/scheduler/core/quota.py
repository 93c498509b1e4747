"""Inference replicas under the same quotas as training jobs: the gate a deployment's reconciler asks before it
starts a replica, and the check a new deployment passes at creation."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

from services.scheduler.core.deployments.model import DeploymentSpec
from services.scheduler.core.policy import NONE, Resources, Tenant, admit_one, check_feasible, replica_demand


class ReplicaQuota:
    """Whether a deployment may start one more replica, counting every tenant's placed jobs and replicas.

    Args:
        tenant: A tenant by name (its record or the default quota).
        capacity: The pool's capacity (blocking at most briefly: cached by the adapter).
        jobs: Tenant -> what its placed jobs hold now.
        replicas: Tenant -> what its deployments' live replicas hold now.
    """

    def __init__(
        self,
        tenant: Callable[[str], Tenant],
        capacity: Callable[[], Resources],
        jobs: Callable[[], Mapping[str, Resources]],
        replicas: Callable[[], Mapping[str, Resources]],
    ) -> None:
        self._tenant = tenant
        self._capacity = capacity
        self._jobs = jobs
        self._replicas = replicas

    def _pool(self) -> Resources:
        # Replicas are not running jobs: that dimension does not apply to them.
        return dataclasses.replace(self._capacity(), jobs=math.inf)

    def admit(self, tenant: str, spec: DeploymentSpec) -> str | None:
        """None when one more replica of ``spec`` fits; else why it waits."""
        usage = dict(self._replicas())
        for name, held in self._jobs().items():
            usage[name] = usage.get(name, NONE) + held
        resources = spec.resources
        demand = replica_demand(1, resources.cpus, resources.gpus, resources.memory_bytes)
        return admit_one(self._tenant(tenant), usage, self._pool(), demand)

    def check_create(self, tenant: str, spec: DeploymentSpec) -> None:
        """Refuse a deployment whose minimum replicas (one, for a deployment that scales to zero) could never
        be placed (FailedPrecondition)."""
        low, _ = spec.replica_bounds
        resources = spec.resources
        demand = replica_demand(max(low, 1), resources.cpus, resources.gpus, resources.memory_bytes)
        check_feasible(demand, self._tenant(tenant), self._pool(), "the deployment's minimum replicas")
