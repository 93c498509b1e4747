"""Ending what a service left behind: its process group, even members that ignore SIGTERM."""

from __future__ import annotations

import subprocess
import sys
import time

from shared.processes import _group_alive, end_process_group

# A parent that starts a child ignoring SIGTERM (as Ray's agents were seen to) and exits at once.
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
LEAVES_A_STUBBORN_CHILD = f"""
import subprocess, sys
subprocess.Popen([sys.executable, "-c", {STUBBORN!r}])
"""


def test_the_group_of_an_exited_service_is_ended_even_members_that_ignore_sigterm() -> None:
    parent = subprocess.Popen([sys.executable, "-c", LEAVES_A_STUBBORN_CHILD], start_new_session=True)
    parent.wait(timeout=30)
    deadline = time.monotonic() + 10
    while not _group_alive(parent.pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # the child is starting
    assert _group_alive(parent.pid)
    end_process_group(parent.pid, grace_s=1.0)
    assert not _group_alive(parent.pid)


def test_ending_a_group_that_is_gone_is_a_no_op() -> None:
    parent = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    parent.wait(timeout=30)
    end_process_group(parent.pid, grace_s=0.5)
    assert not _group_alive(parent.pid)
