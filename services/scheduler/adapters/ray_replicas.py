"""Inference replicas on Ray: every Ray call for them lives here (STYLE.md: one wrapper per actor type).

A replica is a detached ``ServiceHost`` actor named by its replica id in the ``maas`` namespace, hosting
``services.inference.main:hosted`` with the deployment's model loaded and warmed up before ``start``
returns. Detached, so that it outlives a scheduler restart: the next process finds it by name
(:meth:`RayReplicaPool.find`) and re-attaches.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import ray
import structlog

from services.scheduler.adapters import ray_cluster
from services.scheduler.adapters.actor_env import actor_env
from services.scheduler.adapters.service_host import ServiceHost
from services.scheduler.core.deployments.ports import FoundReplica, ReplicaHealth, ReplicaSpec
from services.scheduler.settings import SchedulerSettings
from shared.errors import MaasError

log = structlog.get_logger("maas.scheduler.replicas")
ENTRYPOINT = "services.inference.main:hosted"
REPLICA_PREFIX = "dep-"


def _reason(exc: BaseException) -> str:
    """A failure's text fit for a deployment's message: domain errors as they are (written for clients);
    others by type and an id that finds the full text in the scheduler's log (it may hold paths)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, MaasError):
        return cause.message
    error_id = uuid.uuid4().hex[:12]
    failed = cause if isinstance(cause, BaseException) else exc
    log.warning("replica_start_failed", error_id=error_id, error=str(failed)[:2000], error_type=type(failed).__name__)
    return f"{type(failed).__name__} in the replica (scheduler log error_id={error_id})"


class RayReplicaPool:
    """Implements ``core.deployment_ports.ReplicaPool`` with ``ServiceHost`` actors."""

    def __init__(self, settings: SchedulerSettings) -> None:
        self._settings = settings
        self._actors: dict[str, Any] = {}

    async def _connect(self) -> None:
        await asyncio.to_thread(ray_cluster.connect, self._settings)

    def _options(self, spec: ReplicaSpec) -> dict[str, Any]:
        settings = self._settings
        options: dict[str, Any] = {
            "home": str(settings.home.resolve()),
            "inference_registry_address": settings.scheduler_registry_address,
            "inference_torch_threads": settings.scheduler_replica_torch_threads,
            "inference_device": "cuda" if spec.resources.gpus > 0 else "cpu",
            "log_level": settings.log_level,
            "log_format": "json",
            "models": [
                {
                    "model": spec.model,
                    "version": spec.version,
                    "batching": spec.batching.to_dict(),
                    "require_signature": spec.require_signature,
                }
            ],
        }
        if settings.ray_address:
            options["bind_host"] = "node"
        return options

    async def start(self, spec: ReplicaSpec, timeout_s: float) -> str:
        await self._connect()
        actor = ServiceHost.options(  # type: ignore[attr-defined]
            name=spec.replica_id,
            namespace=ray_cluster.NAMESPACE,
            lifetime="detached",
            max_restarts=0,
            num_cpus=spec.resources.cpus,
            num_gpus=spec.resources.gpus,
            # A deployment's replicas on as many nodes as have room (Ray Serve's default for replicas too):
            # losing a node then leaves replicas serving elsewhere while the lost ones are replaced. Ray's
            # default packs them on the driver's node until it is half full.
            scheduling_strategy="SPREAD",
        ).remote()
        self._actors[spec.replica_id] = actor
        try:
            address: str = await asyncio.wait_for(
                actor.start.remote(ENTRYPOINT, self._options(spec), actor_env(self._settings)), timeout_s
            )
        except TimeoutError:
            await self._kill_async(spec.replica_id)
            raise RuntimeError(
                f"replica not ready within {timeout_s:g}s (waiting for resources, or loading the model)"
            ) from None
        except ray.exceptions.RayActorError:
            await self._kill_async(spec.replica_id)
            raise RuntimeError("the replica's process died while starting") from None
        except ray.exceptions.RayTaskError as exc:
            await self._kill_async(spec.replica_id)
            raise RuntimeError(_reason(exc)) from None
        except BaseException:
            # Cancelled included: the kill must not be cancelled with it (a stray detached actor).
            await asyncio.shield(self._kill_async(spec.replica_id))
            raise
        return address

    def _handle(self, replica_id: str) -> Any:
        actor = self._actors.get(replica_id)
        if actor is None:
            try:
                actor = ray.get_actor(replica_id, namespace=ray_cluster.NAMESPACE)
            except ValueError:
                return None
            self._actors[replica_id] = actor
        return actor

    async def _handle_async(self, replica_id: str) -> Any:
        # A miss asks the GCS (blocking): off the event loop, which serves the scheduler's RPCs.
        return self._actors.get(replica_id) or await asyncio.to_thread(self._handle, replica_id)

    async def _kill_async(self, replica_id: str) -> None:
        await asyncio.to_thread(self._kill, replica_id)

    def _kill(self, replica_id: str) -> None:
        actor = self._actors.pop(replica_id, None) or self._handle(replica_id)
        self._actors.pop(replica_id, None)
        if actor is not None:
            with contextlib.suppress(Exception):  # already gone is fine
                ray.kill(actor, no_restart=True)

    async def stop(self, replica_id: str, grace_s: float) -> None:
        actor = await self._handle_async(replica_id)
        if actor is None:
            return
        if grace_s > 0:
            # The worker finishes its in-flight requests (up to the grace) before the process goes.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(actor.stop.remote(grace_s), grace_s + 5)
        await self._kill_async(replica_id)
        log.info("replica_stopped", replica=replica_id)

    async def ping(self, replica_id: str, timeout_s: float) -> ReplicaHealth:
        actor = await self._handle_async(replica_id)
        if actor is None:
            return ReplicaHealth.DEAD
        try:
            alive = await asyncio.wait_for(actor.ping.remote(), timeout_s)
        except (ray.exceptions.ActorUnavailableError, TimeoutError):
            return ReplicaHealth.UNRESPONSIVE
        except ray.exceptions.RayActorError:
            self._actors.pop(replica_id, None)
            return ReplicaHealth.DEAD
        return ReplicaHealth.OK if alive else ReplicaHealth.UNRESPONSIVE

    async def find(self) -> list[FoundReplica]:
        await self._connect()
        named = await asyncio.to_thread(ray.util.list_named_actors, True)
        found = []
        for entry in named:
            name = entry["name"]
            if entry.get("namespace") != ray_cluster.NAMESPACE or not name.startswith(REPLICA_PREFIX):
                continue
            actor = await self._handle_async(name)
            if actor is None:
                continue
            try:
                address = await asyncio.wait_for(actor.address.remote(), 10) or ""
            except Exception:  # noqa: BLE001 - a replica that cannot answer is reported without address
                address = ""
            found.append(FoundReplica(name, address))
        return found
