"""Ray start-up, in one place: the scheduler is the mesh's only Ray driver (jobs and deployments share it).

``ray_address`` (``MAAS_RAY_ADDRESS`` or Ray's own ``RAY_ADDRESS``) joins a cluster; otherwise a local Ray
declaring ``ray_num_cpus`` logical CPUs starts. Ray already initialised in this process (a test session's)
is used as it is.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import ray

from services.scheduler.settings import SchedulerSettings
from shared.security.files import ensure_secret

NAMESPACE = "maas"
_lock = threading.Lock()


def connect(settings: SchedulerSettings) -> None:
    """Start or join Ray once per process (blocking: call it in a thread)."""
    with _lock:
        if ray.is_initialized():
            return
        common: dict[str, Any] = {
            "namespace": NAMESPACE,
            "include_dashboard": False,
            "log_to_driver": False,
            "configure_logging": False,
        }
        if settings.ray_address:
            ray.init(address=settings.ray_address, **common)
        else:
            # Ray starts worker processes at niceness 15: the inference replicas it hosts would then lose
            # the CPU to every gateway and client process beside them (measured on 2 cores: MLP requests
            # through the gateway at concurrency 32 went from 730-760 to 810-1010 per second with 0).
            # Actors here are services, not background tasks. A cluster sets this on its nodes (deploy/).
            os.environ.setdefault("RAY_worker_niceness", "0")
            # Ray's C++ failure handler would take SIGTERM from the scheduler's own handler (which drains
            # and closes): it dumps a stack and kills the process before Ray's exit hook stops the local
            # Ray, whose agents were then left running after `maas up` stopped.
            os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
            if not settings.insecure:
                # ShadowRay (CVE-2023-48022): a Ray that anyone can reach runs anyone's code. The local Ray
                # requires a token of its own, generated under MAAS_HOME (never a published one).
                token_file = settings.home.resolve() / "ray" / "auth_token"
                ensure_secret(token_file)
                os.environ["RAY_AUTH_MODE"] = "token"
                os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_file)
                _reload_ray_auth()
            _loopback_only()
            ray.init(num_cpus=settings.ray_num_cpus, _node_ip_address="127.0.0.1", **common)


def _loopback_only() -> None:
    """A local Ray is one node: nothing of it may listen where another host can reach it.

    Ray resolves "127.0.0.1" to the host's address, and its GCS, raylet, workers and agents then listen on
    every interface, unless clusters are off (its Windows/macOS default): then the node's address is
    loopback and so is every listener. Its processes read the variable when they start; this process
    imported Ray already, so its constant is set too.
    """
    import ray._private.ray_constants as ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def _reload_ray_auth() -> None:
    """Make this process's Ray core see the token settings just put in the environment: its config and
    token loader are read once and cached (importing Ray is enough), so the driver would otherwise call its
    own GCS without the token."""
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
