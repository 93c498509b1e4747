"""One ``maas up`` per ``MAAS_HOME``, and what a killed one left behind.

``maas up`` holds an exclusive lock on ``MAAS_HOME/run/up.lock`` while it runs (the kernel drops it when
the process dies, however it dies) and records its services' process groups in ``MAAS_HOME/run/mesh.json``.
The next ``maas up`` that takes the lock ends what a killed predecessor left running: services whose parent
was killed, a local Ray whose scheduler was killed, Ray agents that outlived their raylet. They are found by
an environment marker naming the home (inherited by every process a service starts) and by the recorded
process groups (an agent that rewrote its environment with its process title is only found by its group).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import IO

from shared.processes import end_process_group, end_processes_with_env, group_members

MARKER = "MAAS_MESH_HOME"
# Command names (``/proc/<pid>/stat``) a recorded group may hold: a group without any of them is not ours
# any more (its number was reused), and is left alone.
_OURS = ("python", "maas", "ray", "raylet", "gcs_server", "agent")


class MeshBusy(RuntimeError):
    """Another ``maas up`` runs over the same home."""


class MeshLock:
    """The lock and the process record of one ``MAAS_HOME``."""

    def __init__(self, home: Path) -> None:
        self.home = home.resolve()
        self._dir = self.home / "run"
        self._file: IO[str] | None = None

    @property
    def marker(self) -> dict[str, str]:
        """The environment every service (and so every process it starts) of this mesh carries."""
        return {MARKER: str(self.home)}

    def acquire(self) -> list[str]:
        """Take the lock, then end what an earlier, killed ``maas up`` left; returns what was ended.

        Raises:
            MeshBusy: Another ``maas up`` holds the lock.
        """
        self._dir.mkdir(parents=True, exist_ok=True)
        handle = open(self._dir / "up.lock", "a+")  # held open for as long as the mesh runs
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise MeshBusy(
                f"another `maas up` (pid {holder}) is running over {self.home}; stop it first, or set MAAS_HOME "
                "to another directory"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle
        return self._end_leftovers()

    def record(self, pgids: list[int]) -> None:
        """Remember the services' process groups (written before they can start anything)."""
        path = self._dir / "mesh.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "groups": pgids}))
        tmp.replace(path)

    def release(self) -> None:
        """Forget the record (everything it named has ended) and drop the lock."""
        with contextlib.suppress(OSError):
            (self._dir / "mesh.json").unlink()
        if self._file is not None:
            self._file.close()
            self._file = None

    def _end_leftovers(self) -> list[str]:
        ended = end_processes_with_env(MARKER, str(self.home))
        with contextlib.suppress(OSError, ValueError, TypeError):
            groups = json.loads((self._dir / "mesh.json").read_text()).get("groups", [])
            for pgid in groups:
                members = group_members(int(pgid))
                if members and any(name.startswith(_OURS) for name in members.values()):
                    ended.extend(f"{name} ({pid})" for pid, name in members.items())
                    end_process_group(int(pgid))
        return ended


def address_in_use(address: str) -> bool:
    """Whether ``host:port`` cannot be bound (another process listens there); port 0 never is."""
    host, _, port = address.rpartition(":")
    if not port.isascii() or not port.isdigit() or int(port) == 0:
        return False
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As the gRPC servers bind: a port in TIME_WAIT from our own last run is free to them.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]") or "0.0.0.0", int(port)))
        except OSError:
            return True
    return False
