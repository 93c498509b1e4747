"""Where ``maas up``'s services write.

On a terminal the person reads ``maas up``'s own lines only: each service writes JSON log lines to
``MAAS_HOME/logs/<service>.log`` (rotated at ``MAAS_LOG_FILE_MAX_BYTES``), and whatever else it prints (Ray's
and gRPC's own messages, the traceback of a crash) to ``<service>.out``, rewritten at each start. Otherwise
(output to a pipe or file, or ``--log-format json``/``console``) the services write to ``maas up``'s stderr
as they always did, which is what a supervisor or CI collects.

The actors Ray hosts (training ranks, parameter-server shards, inference replicas) write where Ray puts them:
a local Ray's session directory (``log_to_driver`` is off), which :meth:`ServiceLogs.ray_logs` names.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO


@dataclass(frozen=True)
class ServiceLogs:
    """Files under ``directory``, or the shared stream in ``fmt`` when ``directory`` is None."""

    directory: Path | None
    fmt: str

    @classmethod
    def choose(cls, home: Path, fmt: str) -> ServiceLogs:
        to_files = fmt == "auto" and sys.stderr.isatty()
        return cls(home.resolve() / "logs" if to_files else None, fmt)

    def env(self, name: str) -> dict[str, str]:
        """What service ``name``'s environment gets."""
        if self.directory is None:
            return {"MAAS_LOG_FORMAT": self.fmt}
        return {"MAAS_LOG_FILE": str(self.log_file(name))}

    def log_file(self, name: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{name}.log"

    def open_output(self, name: str) -> IO[bytes] | None:
        """The file for service ``name``'s stdout and stderr (None: this process's); the caller closes it
        once the child has it."""
        if self.directory is None:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        return (self.directory / f"{name}.out").open("wb")

    def last_words(self, name: str, lines: int = 15) -> str:
        """Why a service that exited says it did: the end of its ``.out`` (a traceback lands there), else
        of its log; a pointer to the stream when the services write there."""
        if self.directory is None:
            return "its log lines above say why"
        for path in (self.directory / f"{name}.out", self.log_file(name)):
            try:
                text = path.read_text(errors="replace").strip()
            except OSError:
                continue
            if text:
                tail = "\n".join(text.splitlines()[-lines:])
                return f"the end of {path}:\n{tail}"
        return f"nothing in {self.directory}/{name}.out or .log says why"

    @staticmethod
    def ray_logs() -> str:
        """Where the Ray actors' logs are: a local Ray's current session, its temporary directory found as
        Ray finds it (``RAY_TMPDIR``, then ``TMPDIR`` on Linux, then ``/tmp``; read here so that ``maas up``
        need not import Ray), or a cluster's nodes."""
        if os.environ.get("MAAS_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS"):
            return "on the Ray cluster's nodes (`ray logs`)"
        base = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform == "linux" else None)
        return str(Path(base or "/tmp") / "ray" / "session_latest" / "logs")
