"""A real multi-node Ray cluster on this machine, in processes of its own, for one test.

``ray start --head`` and ``ray start --address=...`` with their own ports, temp dir and declared resources,
Ray's token authentication on (a generated token, as the mesh's own local Ray has) and every node on
loopback. The test session's in-process Ray (tests/integration/conftest.py) is left alone: this cluster
shares no port, directory or address with it, and ``ray stop`` is never used (it ends every Ray process of
the machine, other sessions' included); the cluster's processes are found by a marker in their
environment instead, which Ray passes from ``ray start`` to the GCS, raylets, agents and workers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.processes import group_members, processes_with_env
from shared.security.files import ensure_secret

MARKER = "MAAS_TEST_RAY_CLUSTER"

# `ray start`, except that a worker node may join while clusters are "off" (Ray refuses that outright, as
# it does on macOS), and its address stays the loopback address it is given (Ray would replace that with
# the host's): two nodes on one machine, nothing of them reachable from another host.
_RAY_START = """
import sys
import ray._private.ray_constants as constants
import ray._private.services as services
from ray.scripts.scripts import main

constants.ENABLE_RAY_CLUSTER = True
services.resolve_ip_for_localhost = lambda host: host
sys.argv[0] = "ray"
sys.exit(main())
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RayNode:
    """One ``ray start`` of the cluster."""

    name: str
    num_cpus: int
    resources: dict[str, float]
    node_manager_port: int = field(default_factory=free_port)
    object_manager_port: int = field(default_factory=free_port)
    group: int = 0


class RayCluster:
    """Head and worker nodes as separate process trees; the driver's address is :attr:`address`."""

    def __init__(self) -> None:
        # Short: Ray's unix sockets live under it (108 bytes at most for a socket's path).
        self.root = Path(tempfile.mkdtemp(prefix="maas-rc-"))
        self.token_file = self.root / "auth_token"
        ensure_secret(self.token_file)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[RayNode] = []

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to call this cluster: its token (and nothing of the session's own Ray)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(
            {
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(self.token_file),
                # Actors here are services; see services/scheduler/adapters/ray_cluster.py.
                "RAY_worker_niceness": "0",
                "RAY_USAGE_STATS_ENABLED": "0",
                # Loopback only: with clusters "off" a node's address is 127.0.0.1, and Ray's GCS, raylets,
                # agents and workers then listen there alone (services/scheduler/adapters/ray_cluster.py);
                # a driver's own address is loopback too, so that it finds its node among the cluster's.
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            }
        )
        return env

    def _start(self, node: RayNode, *args: str) -> None:
        env = {
            **self.env,
            MARKER: str(self.root),
            # A lost node is declared dead within seconds (Ray's defaults take about 30 s): the GCS checks
            # each raylet every second and gives up after three missed checks.
            "RAY_health_check_initial_delay_ms": "1000",
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
        }
        command = [
            sys.executable,
            "-c",
            _RAY_START,
            "start",
            *args,
            # Per node, and not Ray's default /tmp/ray, where other Rays of this machine keep theirs.
            f"--temp-dir={self.root / node.name}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={node.num_cpus}",
            f"--resources={json.dumps(node.resources)}",
            f"--node-manager-port={node.node_manager_port}",
            f"--object-manager-port={node.object_manager_port}",
            # Workers on ports the OS picks: not Ray's fixed range, which other Rays of this machine use.
            "--min-worker-port=0",
            "--max-worker-port=0",
            "--object-store-memory=100000000",
            "--disable-usage-stats",
            "--log-style=record",
        ]
        with (self.root / f"ray-start-{node.name}.log").open("wb") as out:
            # A session of its own: the node's processes share its process group.
            process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            returncode = process.wait(timeout=120)
        node.group = process.pid
        if returncode != 0:
            raise RuntimeError(f"ray start ({node.name}) failed:\n{self.start_log(node)}")
        self.nodes.append(node)

    def start_log(self, node: RayNode) -> str:
        return (self.root / f"ray-start-{node.name}.log").read_text(errors="replace")[-4000:]

    def start_head(self, num_cpus: int, resources: dict[str, float] | None = None) -> RayNode:
        node = RayNode("head", num_cpus, resources or {})
        self._start(
            node,
            "--head",
            f"--port={self.port}",
            "--include-dashboard=false",
            f"--ray-client-server-port={free_port()}",
        )
        return node

    def add_node(self, name: str, num_cpus: int, resources: dict[str, float]) -> RayNode:
        node = RayNode(name, num_cpus, resources)
        self._start(node, f"--address={self.address}")
        return node

    def raylet_pid(self, node: RayNode) -> int | None:
        """The pid of ``node``'s raylet (found by its node manager port), or None."""
        flag = f"--node_manager_port={node.node_manager_port}"
        for pid in processes_with_env(MARKER, str(self.root)):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"raylet") and flag.encode() in argv:
                return pid
        return None

    def kill_raylet(self, node: RayNode) -> int:
        pid = self.raylet_pid(node)
        if pid is None:
            raise RuntimeError(f"no raylet of node {node.name} is running")
        os.kill(pid, signal.SIGKILL)
        return pid

    def driver(self, code: str, timeout_s: float = 60) -> Any:
        """Run ``code`` in a driver process connected to the cluster; it prints one JSON value, returned.

        A driver of its own process: this one may hold the test session's Ray, and Ray allows one per
        process.
        """
        prelude = (
            "import json, ray\n"
            f"ray.init(address={self.address!r}, namespace='maas', log_to_driver=False, configure_logging=False)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", prelude + code],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"driver failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def processes(self) -> dict[int, str]:
        """The cluster's live processes (every node's): pid -> command name."""
        return processes_with_env(MARKER, str(self.root))

    def group_members(self) -> dict[int, str]:
        """The live processes of the nodes' process groups: agents that overwrote their environment with
        their process title are found only there (Ray's workers get groups of their own, and only the
        environment finds them)."""
        found: dict[int, str] = {}
        for node in self.nodes:
            found.update(group_members(node.group))
        return found

    def listeners(self) -> list[str]:
        """``ss -ltn`` lines of the cluster's TCP listeners."""
        pids = {**self.processes(), **self.group_members()}
        listing = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
        return [line for line in listing.splitlines() if any(f"pid={pid}," in line for pid in pids)]

    def _running(self) -> dict[int, str]:
        return {**self.group_members(), **self.processes()}

    def stop(self, grace_s: float = 30.0) -> dict[int, str]:
        """What ``ray stop`` does, to this cluster's processes alone: SIGTERM to the raylets, then to the
        other processes but the GCS, then to the GCS, each wave given a third of ``grace_s`` to end (the
        raylets first, so that the agents fated to them do not fail; the GCS last, as every other process
        reports to it); SIGKILL to whatever is left. Returns what needed the SIGKILL."""
        raylet = lambda name: name.endswith("raylet")  # noqa: E731
        gcs = lambda name: name.endswith("gcs_server")  # noqa: E731
        for wave in (raylet, lambda name: not raylet(name) and not gcs(name), gcs):
            targets = [pid for pid, name in self._running().items() if wave(name)]
            for pid in targets:
                _signal(pid, signal.SIGTERM)
            _wait_gone(targets, grace_s / 3)
        left = self._running()
        for pid in left:
            _signal(pid, signal.SIGKILL)
        _wait_gone(list(left), 10)
        return left

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _wait_gone(pids: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
