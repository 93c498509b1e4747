"""Two gateway configurations against the same worker, in one run: ``python -m benchmarks.gateway_ab``.

Runs vary by far more than most changes on this VM (the same code gave 0.69-0.93 of bare at c=32 in
consecutive runs), so a gateway setting is judged here in alternating blocks of requests within one mesh:
the mesh's own gateway (default settings) and a second gateway process with ``--env`` settings (default:
``MAAS_GATEWAY_STREAM_HOLD_AFTER=0``), both following the same scheduler and one MLP replica, plus the bare
one-hop server and the worker itself (plain ModelInfer with the version pinned) as references. Prints p50,
p90, p99 and requests/s per system, and the CPU each process used per request (``/proc``).

    python -m benchmarks.gateway_ab --concurrency 32 --rounds 4
    python -m benchmarks.gateway_ab --concurrency 1 --env MAAS_GATEWAY_WORKER_STREAMS=false
    python -m benchmarks.gateway_ab --concurrency 1 --rounds 2 --profile /tmp/ab-profile

``--profile DIR`` then samples the gateway and the worker actor with py-spy (1 kHz, every thread, idle ones
left out) during one more block through gateway-a, and writes each one's collapsed stacks and a summary
(where their busy samples were: self and inclusive, by function) to DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from benchmarks.registry_transfer import Server, _server_env, free_port, wait_healthy, wait_ready
from benchmarks.serving import BATCHING, build_artifacts, infer_request, mlp_input
from benchmarks.serving_mesh import Mesh

_NAMES: dict[str, str] = {}


def _process_cpu_ticks() -> dict[str, int]:
    """pid -> user + system clock ticks of every process (names: ``_NAMES``; kernel threads rename)."""
    ticks = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        _NAMES[pid] = f"{name}[{pid}]"
        ticks[pid] = int(fields[11]) + int(fields[12])
    return ticks


async def _block(call: Callable[[], Awaitable[object]], requests: int, concurrency: int) -> tuple[list[float], float]:
    latencies: list[float] = []

    async def drive(count: int) -> None:
        for _ in range(count):
            started = time.perf_counter()
            await call()
            latencies.append((time.perf_counter() - started) * 1e3)

    started = time.perf_counter()
    await asyncio.gather(*(drive(requests // concurrency) for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


def _summary(raw: Path, top: int = 30) -> str:
    """The busiest functions of a py-spy raw (collapsed) file: self and inclusive shares of all samples."""
    selfs: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = [frame.split(" (")[0] + " (" + frame.rsplit("/", 1)[-1] for frame in stack.split(";") if frame]
        total += count
        if frames:
            selfs[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"{raw.name}: {total} samples"]
    for title, counter in (("self", selfs), ("inclusive", inclusive)):
        lines.append(f"  {title}:")
        lines += [f"    {100 * n / max(total, 1):5.1f}%  {frame}" for frame, n in counter.most_common(top)]
    return "\n".join(lines)


async def _profile(
    directory: Path, pids: dict[str, int], call: Callable[[], Awaitable[object]], requests: int, concurrency: int
) -> None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    directory.mkdir(parents=True, exist_ok=True)
    samplers = [
        await asyncio.create_subprocess_exec(
            spy, "record", "-r", "1000", "--nonblocking", "-f", "raw", "-o", str(directory / f"{name}.txt"),
            "-p", str(pid), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]  # fmt: skip
    await asyncio.sleep(1.0)  # py-spy attaches
    await _block(call, requests, concurrency)
    for sampler in samplers:
        sampler.send_signal(2)  # SIGINT: py-spy writes its file and exits
        await sampler.wait()
    for name in pids:
        if (directory / f"{name}.txt").exists():
            summary = _summary(directory / f"{name}.txt")
            (directory / f"{name}-summary.txt").write_text(summary + "\n")
            print(summary)


async def run(concurrency: int, rounds: int, block: int, env: dict[str, str], profile: Path | None = None) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="maas-gateway-ab-"))
    path, manifest_json, _ = build_artifacts(workdir)["mlp"]
    bare_target = f"127.0.0.1:{free_port()}"
    bare = Server(
        "bare",
        [sys.executable, "-m", "benchmarks.serving_baselines", "--serve-bare", bare_target, "--artifact", str(path)],
        _server_env({}),
        workdir / "bare.log",
    )
    mesh = Mesh(workdir)
    channels: list[grpc.aio.Channel] = []
    try:
        await mesh.start()
        other_target = f"127.0.0.1:{free_port()}"
        other = mesh._start(
            "gateway-b",
            "services.gateway",
            {
                "MAAS_GATEWAY_ADDRESS": other_target,
                "MAAS_GATEWAY_METRICS_ADDRESS": "127.0.0.1:0",
                "MAAS_GATEWAY_SCHEDULER_ADDRESS": mesh.scheduler_target,
                "MAAS_GATEWAY_REGISTRY_ADDRESS": mesh.registry_target,
                **env,
            },
        )
        await wait_healthy(other, other_target)
        await mesh.push("mlp", path, manifest_json)
        deployment = await mesh.deploy("mlp", dict(BATCHING))
        await mesh.wait_gateway_ready("mlp", time.monotonic() + 60, other_target)
        worker = next(r.address for r in deployment.replicas if r.address)
        from inference import grpc_service_pb2_grpc

        request = infer_request("mlp", "input", mlp_input(1))
        pinned = (("maas-model-version", str(deployment.version)),)
        calls: dict[str, Callable[[], Awaitable[object]]] = {}
        for name, target, metadata in (
            ("bare", bare_target, None),
            ("gateway-a", mesh.gateway_target, None),
            ("gateway-b", other_target, None),
            ("worker", worker, pinned),
        ):
            channel = grpc.aio.insecure_channel(target)
            channels.append(channel)
            if name == "bare":
                await wait_ready(bare, channel)
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            calls[name] = lambda stub=stub, metadata=metadata: stub.ModelInfer(request, metadata=metadata)
        for call in calls.values():
            await _block(call, 100, concurrency)  # warm-up
        latencies: dict[str, list[float]] = {name: [] for name in calls}
        seconds = dict.fromkeys(calls, 0.0)
        cpu: dict[str, dict[str, int]] = {name: {} for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                before = _process_cpu_ticks()
                block_latencies, block_seconds = await _block(call, block, concurrency)
                for process, ticks in _process_cpu_ticks().items():
                    used = ticks - before.get(process, 0)
                    if used:
                        cpu[name][process] = cpu[name].get(process, 0) + used
                latencies[name] += block_latencies
                seconds[name] += block_seconds
        tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
        print(f"c={concurrency}, {rounds} rounds of {block} requests per system; gateway-b: {env}")
        for name, values in latencies.items():
            values.sort()
            count = len(values)
            top = sorted(cpu[name].items(), key=lambda item: -item[1])[:3]
            used = ", ".join(f"{_NAMES[pid]} {ticks * tick_us / count:.0f}" for pid, ticks in top)
            print(
                f"  {name:10s} p50 {values[count // 2]:7.3f} p90 {values[int(count * 0.9)]:7.3f} "
                f"p99 {values[int(count * 0.99)]:7.3f} ms  {count / seconds[name]:6.0f} req/s  CPU us/req: {used}"
            )
        if profile is not None:
            busiest = sorted(cpu["worker"].items(), key=lambda item: -item[1])
            worker_pid = next(pid for pid, _ in busiest if int(pid) != os.getpid())
            gateway_pid = next(s.proc.pid for s in mesh.servers if s.name == "gateway")
            pids = {"gateway": gateway_pid, "worker": int(worker_pid)}
            await _profile(profile, pids, calls["gateway-a"], block * rounds, concurrency)
    finally:
        for channel in channels:
            await channel.close()
        await mesh.stop()
        await asyncio.to_thread(bare.stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--block", type=int, default=320, help="requests per system per round")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of gateway-b (repeatable; default MAAS_GATEWAY_STREAM_HOLD_AFTER=0)",
    )
    parser.add_argument("--profile", type=Path, help="sample the gateway and the worker with py-spy into DIR")
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env) or {"MAAS_GATEWAY_STREAM_HOLD_AFTER": "0"}
    asyncio.run(run(args.concurrency, args.rounds, args.block, env, args.profile))


if __name__ == "__main__":
    main()
