"""The one Ray actor class the scheduler creates: it hosts a service's gRPC server inside the actor.

The service is named by an entry point string (``"services.paramserver.main:hosted"``), the way ``maas up``
names a module to run: the scheduler never imports another service, it only knows where each one starts.
The entry point is ``async def hosted(options: dict) -> Hosted`` (an object with ``port`` and ``async
stop()``). Health has its own concurrency group so that a busy service cannot starve the scheduler's
liveness checks.
"""

from __future__ import annotations

import asyncio
import importlib
import os
from typing import Any

import ray

from shared.heap import settle_after_startup
from shared.logging import configure_logging
from shared.tracing import flush_tracing


# Ray's stubs lack the concurrency_groups overload that its runtime accepts.
@ray.remote(concurrency_groups={"health": 1})  # type: ignore[call-overload]
class ServiceHost:
    """Starts one service in this actor's process and reports where it listens."""

    def __init__(self) -> None:
        self._hosted: Any = None
        self._address: str | None = None

    async def start(self, entrypoint: str, options: dict[str, Any], env: dict[str, str]) -> str:
        """Start the service; returns ``host:port`` reachable from other nodes."""
        os.environ.update(env)
        module_name, _, function = entrypoint.partition(":")
        # This process is the service's alone: its lines get a service's shape (JSON with trace ids, level as
        # the scheduler's), which only training ranks would otherwise set up (options' "settings" for them).
        level = options.get("log_level") or options.get("settings", {}).get("log_level") or "info"
        configure_logging(module_name.split(".")[1], level, "json")
        factory = getattr(importlib.import_module(module_name), function)
        self._hosted = await factory(options)
        # This actor's process hosts one service for its whole life: start-up is over.
        settle_after_startup()
        host = ray.util.get_node_ip_address() if options.get("bind_host") == "node" else "127.0.0.1"
        self._address = f"{host}:{self._hosted.port}"
        return self._address

    async def address(self) -> str | None:
        """Where the hosted service listens (None before start): how a restarted scheduler re-attaches."""
        return self._address

    async def stop(self, grace: float | None = None) -> None:
        """Stop the hosted service; ``grace``: seconds its in-flight requests get (None: its default)."""
        if self._hosted is not None:
            # Only pass a grace to services whose stop() takes one (inference workers do).
            await (self._hosted.stop() if grace is None else self._hosted.stop(grace))
            self._hosted = None
        await self.flush()

    async def flush(self, timeout_s: float = 5.0) -> bool:
        """Export the spans this process still holds: the scheduler ends actors with ``ray.kill``, which
        runs no exit hook, so it calls this (or ``stop``) first."""
        return await asyncio.to_thread(flush_tracing, timeout_s)

    @ray.method(concurrency_group="health")
    async def ping(self) -> bool:
        return self._hosted is not None
