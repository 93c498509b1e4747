"""One job's gang on Ray: its placement group and the actors hosting its shards and workers.

All Ray calls for a job live here (STYLE.md: one wrapper per actor type). Shards and workers are
``ServiceHost`` actors named ``<job>-shard-<i>-<attempt>`` / ``<job>-worker-<rank>-<attempt>`` in the
``maas`` namespace, so a restarted scheduler can find them again. Actors and the placement group are
detached: Ray would otherwise destroy them with the last handle (the scheduler's), and the scheduler removes
them itself when the job ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Set
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from services.scheduler.adapters.service_host import ServiceHost
from services.scheduler.core.jobs.model import Job, ResourceRequest

NAMESPACE = "maas"
SHARD_ENTRYPOINT = "services.paramserver.main:hosted"
WORKER_ENTRYPOINT = "services.training.main:hosted"
# ``<job id>-<role>-<index>-<attempt>`` actors and ``maas-<job id>`` placement groups (job ids: job-<hex>).
_MEMBER_NAME = re.compile(r"^(job-[0-9a-z]+)-(?:shard|worker)-\d+-\d+$")
_GROUP_NAME = re.compile(r"^maas-(job-[0-9a-z]+)$")


@dataclass
class Member:
    """One actor of the gang and where its service listens."""

    role: str  # "shard" or "worker"
    index: int
    attempt: int
    actor: Any
    address: str = ""

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}-{self.attempt}"


def _bundle(resources: ResourceRequest) -> dict[str, float]:
    bundle = {"CPU": resources.cpus or 1.0}
    if resources.gpus:
        bundle["GPU"] = resources.gpus
    return bundle


@dataclass
class Gang:
    job: Job
    group: PlacementGroup | None = None
    shards: list[Member] = field(default_factory=list)
    workers: list[Member] = field(default_factory=list)

    @property
    def _bundles(self) -> list[dict[str, float]]:
        spec = self.job.spec
        return [_bundle(spec.shard_resources)] * spec.shards + [_bundle(spec.worker_resources)] * spec.workers

    async def place(self, timeout_s: float) -> bool:
        """Reserve every bundle at once (a gang: all or nothing); False if Ray cannot within the timeout."""
        name = f"maas-{self.job.id}"
        with contextlib.suppress(ValueError):
            # A group a previous scheduler process left, whose actors could not be re-attached to.
            remove_placement_group(ray.util.get_placement_group(name))
        self.group = placement_group(self._bundles, strategy="PACK", name=name, lifetime="detached")
        try:
            await asyncio.wait_for(self.group.ready(), timeout_s)
            return True
        except TimeoutError:
            remove_placement_group(self.group)
            self.group = None
            return False

    def shortage(self) -> str:
        """What the cluster lacks for this gang now, in words, from Ray's resource totals (for a job whose
        placement timed out)."""
        needed: dict[str, float] = {}
        for bundle in self._bundles:
            for name, amount in bundle.items():
                needed[name] = needed.get(name, 0.0) + amount
        total, free = ray.cluster_resources(), ray.available_resources()
        lacking = []
        for name, amount in sorted(needed.items()):
            have, available = total.get(name, 0.0), free.get(name, 0.0)
            if amount > have:
                lacking.append(f"{amount - have:g} {name} (the gang needs {amount:g}, the cluster has {have:g} in all)")
            elif amount > available:
                lacking.append(
                    f"{amount - available:g} {name} (the gang needs {amount:g}, {available:g} of {have:g} free)"
                )
        if not lacking:
            # Enough in sum: the bundles did not fit on the nodes, or other work released resources since.
            return "the cluster lacks room for its bundles on its nodes (enough in sum now, not per node)"
        return "the cluster lacks " + "; ".join(lacking)

    def _create(self, role: str, index: int, attempt: int) -> Member:
        assert self.group is not None
        spec = self.job.spec
        resources = spec.shard_resources if role == "shard" else spec.worker_resources
        bundle = index if role == "shard" else spec.shards + index
        actor = ServiceHost.options(  # type: ignore[attr-defined]
            name=f"{self.job.id}-{role}-{index}-{attempt}",
            namespace=NAMESPACE,
            lifetime="detached",
            max_restarts=0,
            num_cpus=resources.cpus or 1.0,
            num_gpus=resources.gpus or 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.group, placement_group_bundle_index=bundle
            ),
        ).remote()
        return Member(role, index, attempt, actor)

    async def start(
        self, role: str, index: int, attempt: int, options: dict[str, Any], env: dict[str, str] | None = None
    ) -> Member:
        member = self._create(role, index, attempt)
        entrypoint = SHARD_ENTRYPOINT if role == "shard" else WORKER_ENTRYPOINT
        member.address = await member.actor.start.remote(entrypoint, options, env or {})
        members = self.shards if role == "shard" else self.workers
        while len(members) <= index:
            members.append(member)
        members[index] = member
        return member

    @staticmethod
    async def alive(member: Member, timeout_s: float = 5.0) -> bool:
        try:
            return bool(await asyncio.wait_for(member.actor.ping.remote(), timeout_s))
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, TimeoutError):
            return False

    async def flush_telemetry(self, timeout_s: float = 5.0) -> None:
        """Have every member export the spans it still holds, before :meth:`teardown` kills it (a member
        that is gone or slow is not waited for beyond ``timeout_s``)."""
        calls = [member.actor.flush.remote(timeout_s) for member in [*self.workers, *self.shards]]
        if calls:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout_s + 1)

    @staticmethod
    def kill(member: Member) -> None:
        with contextlib.suppress(Exception):  # already gone is fine
            ray.kill(member.actor, no_restart=True)

    def teardown(self) -> None:
        for member in [*self.workers, *self.shards]:
            self.kill(member)
        if self.group is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(self.group)
            self.group = None

    @classmethod
    async def find(cls, job: Job) -> Gang | None:
        """The gang a previous scheduler process left running, if all of it is still alive."""
        pattern = re.compile(rf"^{re.escape(job.id)}-(shard|worker)-(\d+)-(\d+)$")
        latest: dict[tuple[str, int], int] = {}
        for name in ray.util.list_named_actors():
            if match := pattern.match(name):
                key = (match[1], int(match[2]))
                latest[key] = max(latest.get(key, -1), int(match[3]))
        spec = job.spec
        if len(latest) != spec.shards + spec.workers:
            return None
        gang = cls(job)
        for (role, index), attempt in sorted(latest.items()):
            actor = ray.get_actor(f"{job.id}-{role}-{index}-{attempt}", namespace=NAMESPACE)
            member = Member(role, index, attempt, actor)
            if not await cls.alive(member):
                return None
            member.address = await member.actor.address.remote() or ""
            (gang.shards if role == "shard" else gang.workers).append(member)
        with contextlib.suppress(Exception):
            gang.group = ray.util.get_placement_group(f"maas-{job.id}")
        return gang


def remove_jobs(select: Callable[[str], bool]) -> list[str]:
    """Kill the shard and worker actors and remove the placement groups of every job whose id ``select``
    picks; returns their names (blocking: call it in a thread)."""
    removed: list[str] = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        match = _MEMBER_NAME.match(name)
        if entry.get("namespace") != NAMESPACE or match is None or not select(match[1]):
            continue
        with contextlib.suppress(ValueError):  # gone meanwhile
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
            removed.append(name)
    for group_id, info in ray.util.placement_group_table().items():
        name = info.get("name") or ""
        match = _GROUP_NAME.match(name)
        if match is None or info.get("state") == "REMOVED" or not select(match[1]):
            continue
        with contextlib.suppress(Exception):  # removed meanwhile
            remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group_id)))
            removed.append(name)
    return removed


def sweep(keep: Set[str]) -> list[str]:
    """Remove the actors and placement groups of every job not in ``keep`` (blocking)."""
    return remove_jobs(lambda job_id: job_id not in keep)
