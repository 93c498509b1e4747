"""``maas tenants``, ``maas usage`` and ``maas train list`` against a real scheduler on loopback.

The scheduler runs in this process on port 0 with a runner that holds jobs RUNNING until cancelled (no Ray);
each command runs through the ``maas`` entry point (typer's test runner) in a thread of its own, since a
command runs its own event loop, and the tests read what it prints.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from services.cli.main import app
from services.cli.tenants import format_bytes, parse_bytes
from services.scheduler.main import RunningScheduler, start
from services.scheduler.settings import SchedulerSettings
from shared.errors import InvalidArgument
from tests.contract.test_scheduler_tenants import HoldingRunner


@pytest.fixture
async def scheduler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RunningScheduler]:
    settings = SchedulerSettings(
        home=tmp_path / "home",
        scheduler_address="127.0.0.1:0",
        scheduler_metrics_address="127.0.0.1:0",
        scheduler_database_url=f"sqlite:///{tmp_path / 'scheduler.db'}",
        scheduler_data_root=tmp_path / "data",
        scheduler_max_running_jobs=10,
        ray_num_cpus=8,
        shutdown_grace_s=0.5,
    )
    runner = HoldingRunner()
    running = await start(settings, lambda: runner)
    # What the command reads: the scheduler's address, a home without `maas up`'s credentials (development
    # mode comes from tests/conftest.py), and a terminal wide enough that table cells do not wrap.
    monkeypatch.setenv("MAAS_SCHEDULER_ADDRESS", f"127.0.0.1:{running.port}")
    monkeypatch.setenv("MAAS_HOME", str(tmp_path / "cli-home"))
    monkeypatch.setenv("COLUMNS", "250")
    yield running
    await running.server.stop(0.2)


async def maas(*args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, app, list(args))


async def ok(*args: str) -> str:
    result = await maas(*args)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result.stdout


def row(output: str, first: str) -> list[str]:
    """The cells (empty ones too) of the table row that starts with ``first``."""
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{output}")


async def wait_for(args: tuple[str, ...], text: str, timeout: float = 10.0) -> str:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        output = await ok(*args)
        if text in output:
            return output
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{text!r} not in:\n{output}")
        await asyncio.sleep(0.1)


def test_sizes_parse_and_print() -> None:
    assert parse_bytes("2Gi") == 2 * 1024**3
    assert parse_bytes("512Mi") == 512 * 1024**2
    assert parse_bytes("1.5G") == 1_500_000_000
    assert parse_bytes("2GiB") == parse_bytes("2gi") == 2 * 1024**3
    assert parse_bytes("1073741824") == 1024**3
    with pytest.raises(InvalidArgument, match="--memory: expected bytes or a size"):
        parse_bytes("lots")
    assert (format_bytes(2 * 1024**3), format_bytes(1536 * 1024), format_bytes(512)) == ("2 GiB", "1.5 MiB", "512 B")


async def test_tenants_are_created_shown_listed_and_their_quota_replaced(scheduler: RunningScheduler) -> None:
    created = await ok("tenants", "create", "team-a", "--cpus", "4", "--memory", "2Gi", "--borrow-cpus", "2")
    assert "tenant team-a (created " in created
    assert row(created, "cpus") == ["cpus", "4", "2"]
    assert row(created, "memory") == ["memory", "2 GiB", "no limit"]  # a given borrowing limit: unset = no limit
    assert row(created, "gpus") == ["gpus", "no limit", "no limit"]
    assert "priority classes granted: none" in created

    await ok("tenants", "create", "team-b", "--jobs", "1")
    listed = await ok("tenants", "list")
    assert row(listed, "team-a") == [
        "team-a",
        "4",
        "no limit",
        "2 GiB",
        "no limit",
        "no limit",
        "cpus 2, others no limit",
        "",
    ]
    assert row(listed, "team-b") == ["team-b", "no limit", "no limit", "no limit", "1", "no limit", "none", ""]

    # quota replaces everything: the memory amount and the borrowing limit left out are gone.
    replaced = await ok("tenants", "quota", "team-a", "--cpus", "6", "--gpus", "1", "--priority-class", "high")
    assert row(replaced, "cpus") == ["cpus", "6", "none"]
    assert row(replaced, "memory") == ["memory", "no limit", "none"]
    assert "priority classes granted: high" in replaced
    got = await ok("tenants", "get", "team-a")
    assert row(got, "gpus") == ["gpus", "1", "none"] and "priority classes granted: high" in got

    # --borrow alone: borrowing without a limit.
    borrowing = await ok("tenants", "quota", "team-b", "--jobs", "1", "--borrow")
    assert row(borrowing, "jobs") == ["jobs", "1", "no limit"]
    assert row(await ok("tenants", "list"), "team-b")[-2:] == ["no limit", ""]
    assert row(await ok("tenants", "list"), "team-a")[-2:] == ["none", "high"]


async def test_failures_are_one_line_and_a_non_zero_exit(scheduler: RunningScheduler) -> None:
    negative = await maas("tenants", "create", "neg", "--cpus", "-1")
    assert negative.exit_code == 1
    assert negative.stderr.startswith("error (INVALID_ARGUMENT): ")
    assert "tenant.quota.cpus: must be >= 0" in negative.stderr
    assert "Traceback" not in negative.stderr + negative.stdout and len(negative.stderr.strip().splitlines()) == 1

    missing = await maas("tenants", "get", "nobody")
    assert missing.exit_code == 1 and "error (NOT_FOUND)" in missing.stderr

    bad_size = await maas("tenants", "create", "team-x", "--memory", "lots")
    assert bad_size.exit_code == 1 and "--memory: expected bytes or a size" in bad_size.stderr

    await ok("tenants", "create", "team-x")
    again = await maas("tenants", "create", "team-x")
    assert again.exit_code == 1 and "error (ALREADY_EXISTS)" in again.stderr

    unknown_class = await maas(
        "train", "submit", "m", "--tenant", "team-x", "--priority-class", "platinum", "--no-watch"
    )
    assert unknown_class.exit_code == 1 and "unknown priority class 'platinum'" in unknown_class.stderr
    not_granted = await maas("train", "submit", "m", "--tenant", "team-x", "--priority-class", "high", "--no-watch")
    assert not_granted.exit_code == 1 and "error (PERMISSION_DENIED)" in not_granted.stderr


async def test_usage_and_the_queue_show_why_a_job_waits(scheduler: RunningScheduler) -> None:
    # A job with the command's defaults: 2 workers and 2 shards of 1 CPU each, a gang of 4 CPUs.
    await ok("tenants", "create", "team-a", "--cpus", "4")
    submit = ("train", "submit", "digits-cnn", "--tenant", "team-a", "--epochs", "1", "--no-watch")
    first = (await ok(*submit)).split()[0]
    await wait_for(("train", "list", "--state", "RUNNING"), first)

    # The first job's gang takes the whole CPU quota: the second waits for quota, first in the queue.
    second = (await ok(*submit, "--priority-class", "low")).split()[0]
    queued = await wait_for(("train", "list", "--state", "QUEUED"), "at its quota")
    cells = row(queued, second)
    assert cells[1:5] == ["team-a", "QUEUED", "1", "low (-100)"]
    assert "tenant 'team-a' is at its quota: 4 CPUs in use of 4 CPUs" in cells[-1]
    status = await ok("train", "status", second)
    assert f"{second} QUEUED (position 1 in the queue)" in status and "at its quota" in status
    running = row(await ok("train", "list", "--tenant", "team-a"), first)
    assert running[1:5] == ["team-a", "RUNNING", "", "0"] and running[-1] == ""

    usage = await ok("usage", "team-a")
    assert "tenant team-a: jobs running 1, queued 1" in usage
    assert row(usage, "cpus") == ["cpus", "4", "4", "none", ""]
    assert row(usage, "jobs") == ["jobs", "1", "no limit", "none", ""]
    assert row(usage, "gpus") == ["gpus", "0", "no limit", "none", ""]

    # A tenant without a record: the default quota, and nothing used.
    other = await ok("usage", "team-z")
    assert "tenant team-z (no record: the default quota): jobs running 0, queued 0" in other

    # Borrowing over the quota is marked.
    await ok("tenants", "quota", "team-a", "--cpus", "3", "--borrow-cpus", "4")
    marked = await ok("usage", "team-a")
    assert row(marked, "cpus") == ["cpus", "4", "3", "4", "borrowing (over quota)"]

    # The caller's own tenant by default (development mode: the tenant `default`).
    assert "tenant default " in await ok("usage")
