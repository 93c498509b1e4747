"""Ending the processes a mesh left behind.

A local Ray started by the scheduler runs agents (dashboard agent, runtime-env agent) that were seen to
outlive the scheduler's graceful stop, ignoring SIGTERM, once their raylet and GCS were gone. Whoever
started the mesh ends them: by process group (``maas up`` starts each service in its own session, which
Ray's processes inherit), or by an environment variable they inherited (the benchmarks, as well; an
agent that has already overwritten its environment with its process title is only found by its group).
Linux only (``/proc``); elsewhere nothing is found.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def processes_with_env(name: str, value: str) -> dict[int, str]:
    """Processes (other than this one) whose environment has ``name=value``: pid -> command name."""
    marker = f"{name}={value}".encode()
    found: dict[int, str] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0") and _running(int(entry.name)):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
    return found


def end_processes_with_env(name: str, value: str, grace_s: float = 3.0) -> list[str]:
    """SIGTERM, then after ``grace_s`` SIGKILL, every process carrying ``name=value``; returns them."""
    found = processes_with_env(name, value)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_running(pid) for pid in found):
            time.sleep(0.1)
    return [f"{command} ({pid})" for pid, command in found.items()]


def end_process_group(pgid: int, grace_s: float = 3.0) -> None:
    """SIGTERM, then after ``grace_s`` SIGKILL, what is left of process group ``pgid``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    return bool(group_members(pgid))


def group_members(pgid: int) -> dict[int, str]:
    """The live processes of process group ``pgid``: pid -> command name (from ``/proc/<pid>/stat``)."""
    found: dict[int, str] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            head, tail = (entry / "stat").read_text().rsplit(")", 1)
        except OSError:
            continue
        fields = tail.split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            found[int(entry.name)] = head.split("(", 1)[1]
    return found


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False
