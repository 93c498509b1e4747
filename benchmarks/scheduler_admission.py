"""How fast the scheduler takes jobs in: ``python -m benchmarks.scheduler_admission [--quick] [--jobs N]``.

A real scheduler server (``services.scheduler.main.start``, the full interceptor chain, development mode) in
its own process on a loopback port 0, over SQLite (WAL, its default) and then over a throwaway PostgreSQL
(``tests.support.postgres``: Debian's binaries, fsync off as in the tests). Its job runner is stubbed at the
Ray boundary only: a job admitted is reported RUNNING and held, so admission runs as in production (one
slot, the default) but Ray never starts. A client in this process submits ``--jobs`` small training jobs
(an MLP on digits, each with its own ``request_id``) through ``SubmitTrainingJob`` with ``--concurrency``
calls in flight, after a warm-up; every call's latency is recorded, and the jobs stored are counted in the
database afterwards ("persisted").

Baseline, measured in the same run at the same concurrency: a bare ``grpc.aio`` unary echo (generic
handler, no interceptors, no protobuf) in its own process, sent the same serialized request. The ratio is
scheduler submissions/s over echo calls/s.

Targets (the scheduler issue): >= 500 submissions/s persisted, p99 < 50 ms. Written to
``benchmarks/results/scheduler_admission.json``. ``--profile`` samples the scheduler process with py-spy
(every thread, the measured submissions only) and writes its top functions next to the figures and the
collapsed stacks to ``benchmarks/results/scheduler_admission-profile-*.txt``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ECHO_METHOD = "/bench.Echo/Echo"
TARGET_PER_S = 500.0
TARGET_P99_MS = 50.0


# -- the servers (child processes) --------------------------------------------------------------------------


class HoldingRunner:
    """The JobRunner port stubbed at the Ray boundary: reports the job RUNNING and holds it until cancelled."""

    async def run(self, job: Any, reporter: Any) -> None:
        await reporter.running(job.id)
        await asyncio.Event().wait()

    async def resume(self, job: Any, reporter: Any) -> None:
        await self.run(job, reporter)

    async def cancel(self, job_id: str) -> None:
        return None

    async def preempt(self, job: Any, grace_s: float) -> None:
        # Nothing to checkpoint at the Ray boundary: the gang is released at once (a higher-priority
        # submission preempts the held job, as on a real pool).
        return None

    async def sweep(self, keep: set[str]) -> list[str]:
        return []


async def _until_stdin_closes() -> None:
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def serve_scheduler(url: str, home: Path) -> None:
    from services.scheduler.main import start
    from services.scheduler.settings import SchedulerSettings
    from shared.logging import configure_logging

    settings = SchedulerSettings(
        home=home,
        scheduler_address="127.0.0.1:0",
        scheduler_metrics_address="127.0.0.1:0",
        scheduler_database_url=url,
        scheduler_data_root=home / "data",
        shutdown_grace_s=0.5,
    )
    # As services.scheduler.main.main() does (the same log level: a log line per submission is part of it).
    configure_logging("scheduler", settings.log_level, settings.log_format)
    running = await start(settings, HoldingRunner)
    print(f"PORT {running.port}", flush=True)
    await _until_stdin_closes()
    await running.server.stop(0.5)


async def serve_echo() -> None:
    import grpc

    def echo(request: bytes, context: Any) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"PORT {port}", flush=True)
    await _until_stdin_closes()
    await server.stop(0.2)


@contextlib.contextmanager
def child(*args: str) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """Start ``python -m benchmarks.scheduler_admission <args>``; yield its port; stop it (stdin closed)."""
    env = {**os.environ, "MAAS_INSECURE": "1", "RAY_DISABLE_USAGE_STATS": "1"}
    command = [sys.executable, "-m", "benchmarks.scheduler_admission", *args]
    proc = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"{args[0]} did not start (exit {proc.poll()})")
        yield int(line.split()[1]), proc
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` (all its threads) so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def spying(pid: int, profile: Path | None) -> Iterator[None]:
    """Sample ``pid`` with py-spy into ``profile`` (collapsed stacks) while the block runs: the measured
    submissions only, not the start-up and warm-up (imports and first validations would dominate)."""
    if profile is None:
        yield
        return
    spy = subprocess.Popen(
        [
            shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"),
            *("record", "--pid", str(pid), "--format", "raw", "--output", str(profile)),
            *("--rate", "200", "--threads", "--nonblocking"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            spy.wait(30)


# -- the load ----------------------------------------------------------------------------------------------


DATASETS = {
    # scikit-learn's digits: validating it at submit re-reads the gzipped CSV (about 45 ms of CPU).
    "digits": {},
    # A small generated set: what submission costs when the dataset is cheap to validate.
    "synthetic-classification": {"num_samples": "512", "num_features": "64", "num_classes": "10"},
}


def job_request(i: int, dataset: str = "digits") -> Any:
    """A small training job: an MLP on ``dataset``, 2 workers, 1 shard; each with its own request id."""
    from maas.common.v1 import common_pb2
    from maas.paramserver.v1 import paramserver_pb2
    from maas.scheduler.v1 import scheduler_pb2 as pb

    spec = pb.TrainingJobSpec(
        architecture="mlp",
        arguments_json='{"in_features": 64, "hidden": [32], "out_features": 10}',
        dataset=pb.DatasetSpec(name=dataset, options=DATASETS[dataset]),
        optimizer=paramserver_pb2.OptimizerSpec(name="sgd", hyperparameters={"lr": 0.05}),
        batch_size=32,
        epochs=1,
        workers=2,
        shards=1,
        target_model="bench-mlp",
        worker_resources=common_pb2.ResourceRequest(cpus=0.5),
        shard_resources=common_pb2.ResourceRequest(cpus=0.5),
        priority=i % 7,
        tenant=f"team-{i % 4}",
    )
    return pb.SubmitTrainingJobRequest(spec=spec, request_id=f"bench-{i:06d}")


async def drive(call: Callable[[int], Awaitable[Any]], start: int, count: int, concurrency: int) -> dict[str, Any]:
    """``count`` calls numbered from ``start``, ``concurrency`` in flight; throughput and latency figures."""
    import grpc

    latencies: list[float] = []
    numbers = iter(range(start, start + count))
    errors = 0

    async def worker() -> None:
        nonlocal errors
        for i in numbers:
            began = time.perf_counter()
            try:
                await call(i)
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - began
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))], 2) if ordered else 0.0

    return {
        "calls": count,
        "errors": errors,
        "seconds": round(wall, 3),
        "per_s": round(len(latencies) / wall, 1),
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "mean_ms": round(1000 * statistics.fmean(ordered), 2) if ordered else 0.0,
    }


async def measure_echo(jobs: int, warmup: int, concurrency: int) -> dict[str, Any]:
    import grpc

    payloads = [job_request(i).SerializeToString() for i in range(warmup + jobs)]
    with child("--serve-echo") as (port, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            echo = channel.unary_unary(ECHO_METHOD)

            async def call(i: int) -> Any:
                return await echo(payloads[i], timeout=30)

            await drive(call, 0, warmup, concurrency)
            return await drive(call, warmup, jobs, concurrency)


def count_jobs(url: str) -> int:
    import sqlalchemy as sa

    from services.scheduler.adapters.sql.tables import jobs as jobs_table
    from shared.sql import create_engine

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(jobs_table)).scalar_one())
    finally:
        engine.dispose()


async def measure_scheduler(
    url: str, home: Path, jobs: int, warmup: int, concurrency: int, profile: Path | None, dataset: str
) -> dict[str, Any]:
    import grpc
    from maas.scheduler.v1 import scheduler_pb2_grpc

    requests = [job_request(i, dataset) for i in range(warmup + jobs)]
    with child("--serve-scheduler", url, str(home)) as (port, proc):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)

            async def call(i: int) -> Any:
                return await stub.SubmitTrainingJob(requests[i], timeout=30)

            await drive(call, 0, warmup, concurrency)
            cpu_before = cpu_seconds(proc.pid)
            with spying(proc.pid, profile):
                figures = await drive(call, warmup, jobs, concurrency)
            # CPU time per submission: what the scheduler spends, whatever else the machine runs.
            figures["cpu_ms_per_submission"] = round(1000 * (cpu_seconds(proc.pid) - cpu_before) / jobs, 3)
            # A retry of a stored submission: answered from the store, no new job.
            figures["retries_same_job"] = (await call(warmup)).job.id == (await call(warmup)).job.id
    stored = await asyncio.to_thread(count_jobs, url)
    figures["persisted"] = stored - warmup
    figures["persisted_per_s"] = round(min(figures["persisted"], jobs - figures["errors"]) / figures["seconds"], 1)
    figures["meets_target"] = figures["persisted_per_s"] >= TARGET_PER_S and figures["p99_ms"] < TARGET_P99_MS
    return figures


@contextlib.asynccontextmanager
async def database(kind: str, workdir: Path) -> AsyncIterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{workdir / 'scheduler.db'}"
        return
    from tests.support.postgres import postgres_server

    with postgres_server() as server:
        yield server.create_database("bench_scheduler")


def top_functions(raw: Path, limit: int = 25) -> list[str]:
    """py-spy's raw (collapsed stacks) output -> the functions with the most samples on their stack."""
    if not raw.exists():
        return []
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
        own[frames[-1]] = own.get(frames[-1], 0) + count
    ranked = sorted(inclusive.items(), key=lambda kv: -kv[1])[:limit]
    return [f"{100 * n / total:5.1f}% incl {100 * own.get(f, 0) / total:5.1f}% self  {f}" for f, n in ranked]


async def run(
    jobs: int, warmup: int, concurrency: int, kinds: list[str], profile: bool, datasets: list[str]
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.scheduler_admission", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "jobs": jobs,
        "warmup": warmup,
        "concurrency": concurrency,
        "targets": {"persisted_per_s": TARGET_PER_S, "p99_ms": TARGET_P99_MS},
    }
    echo = await measure_echo(jobs, warmup, concurrency)
    report["echo_baseline"] = echo
    print(
        f"echo baseline    {echo['per_s']:8.1f} calls/s  p50 {echo['p50_ms']} ms  p99 {echo['p99_ms']} ms", flush=True
    )
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="maas-bench-admission-") as tmp:
        for kind, dataset in [(k, d) for k in kinds for d in datasets]:
            workdir = Path(tmp) / f"{kind}-{dataset}"
            workdir.mkdir()
            raw = RESULTS / f"scheduler_admission-profile-{kind}-{dataset}.txt" if profile else None
            async with database(kind, workdir) as url:
                figures = await measure_scheduler(url, workdir / "home", jobs, warmup, concurrency, raw, dataset)
            figures["ratio_to_echo"] = round(figures["per_s"] / echo["per_s"], 3) if echo["per_s"] else None
            if raw is not None:
                figures["profile_top"] = top_functions(raw)
            report[f"{kind}/{dataset}"] = figures
            print(
                f"scheduler {kind:10} {dataset:24} {figures['persisted_per_s']:8.1f} persisted/s  "
                f"p50 {figures['p50_ms']} ms  "
                f"p99 {figures['p99_ms']} ms  cpu {figures['cpu_ms_per_submission']} ms/job  "
                f"errors {figures['errors']}  "
                f"ratio to echo {figures['ratio_to_echo']}  "
                f"target {'met' if figures['meets_target'] else 'missed'}",
                flush=True,
            )
            for line in figures.get("profile_top", []):
                print("   ", line)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 jobs instead of 2,000.")
    parser.add_argument("--jobs", type=int, default=None, help="Submissions measured (default 2000).")
    parser.add_argument("--concurrency", type=int, default=16, help="Calls in flight.")
    parser.add_argument("--databases", default="sqlite,postgresql", help="Comma-separated: sqlite, postgresql.")
    parser.add_argument(
        "--datasets", default="digits,synthetic-classification", help=f"Comma-separated, of {', '.join(DATASETS)}."
    )
    parser.add_argument("--profile", action="store_true", help="Sample the scheduler with py-spy.")
    parser.add_argument("--serve-scheduler", nargs=2, metavar=("URL", "HOME"), help=argparse.SUPPRESS)
    parser.add_argument("--serve-echo", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_scheduler:
        asyncio.run(serve_scheduler(args.serve_scheduler[0], Path(args.serve_scheduler[1])))
        return
    if args.serve_echo:
        asyncio.run(serve_echo())
        return
    jobs = args.jobs or (300 if args.quick else 2000)
    warmup = 50
    report = asyncio.run(
        run(jobs, warmup, args.concurrency, args.databases.split(","), args.profile, args.datasets.split(","))
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scheduler_admission.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
