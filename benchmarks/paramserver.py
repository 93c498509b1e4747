"""Parameter-server push and pull throughput of a ~100M-parameter model against a bare grpc.aio stream.

Run ``python -m benchmarks.paramserver``; ``--quick`` uses a ~12.6M-parameter model instead. In one run it:

1. for each shard count (1, 2, 4) starts that many real shard servers (``python -m services.paramserver``),
   each its own process on a free loopback port with a throwaway MAAS_HOME, waits for ``grpc.health.v1``
   SERVING, and gives them one job: a zoo ``mlp`` (``in_features=4096``, ``hidden=[4096]*5``,
   ``out_features=4096``: 100.7M float32 parameters, 403 MB), one worker, ``asp`` (nothing waits), SGD with
   ``lr=0``;
2. as that worker (``shared.clients.paramserver.ParamServerClient`` unchanged, one channel per shard),
   encodes a zero gradient for every piece of the job's plan once with codec ``none`` (raw float32, as
   the shards send parameters back), then times a push of every piece to every shard concurrently, and a
   pull of every piece from every shard concurrently (empty versions and incarnation, so each shard sends
   everything it holds);
3. times the same number of bytes through a bare grpc.aio server in another process (generic handlers, no
   interceptors, no protobuf: a client-streaming method that counts and discards, a server-streaming
   method that sends a preallocated block), with 4 MiB chunks, over one stream each way (the reference)
   and, for comparison, split over as many bare server processes as there are shards;
4. repeats each transfer ``--runs`` times (best kept), alternating bare and parameter server so machine
   noise hits both alike; prints a table and writes ``benchmarks/results/paramserver.json``.

GB/s is 10**9 bytes of float32 parameters moved per second; "combined" is push and pull bytes over push
plus pull time. The target is parameter server / bare (one stream) >= 0.6.

Encoding the gradient (for ``none``: one copy into bytes) happens once before the timed pushes and is
reported apart. The push time runs until every shard has answered, i.e. includes the shard decoding,
checking (NaN/inf) and applying the gradient; the pull time includes the shard copying its pieces and
the client assembling and decoding them into float32 tensors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from benchmarks.registry_transfer import BARE_SERVICE, Server, cpu_seconds, free_port, rss_mib, wait_ready

MiB = 1024 * 1024
GB = 1_000_000_000
CHUNK_BYTES = 4 * MiB
MAX_MESSAGE_BYTES = 8 * MiB
MODEL = {"in_features": 4096, "hidden": [4096] * 5, "out_features": 4096}  # 100.7M parameters
QUICK_MODEL = {"in_features": 2048, "hidden": [2048] * 2, "out_features": 2048}  # 12.6M parameters
SHARD_COUNTS = (1, 2, 4)
TARGET_RATIO = 0.6
JOB_ID = "bench-ps"
START_TIMEOUT_S = 120.0
INIT_TIMEOUT_S = 300.0
TRANSFER_TIMEOUT_S = 300.0
REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "paramserver.json"
QUICK_RESULTS = REPO / "benchmarks" / "results" / "paramserver-quick.json"
CODE_PATH = (
    "services/paramserver/api/servicer.py",
    "services/paramserver/core/host.py",
    "services/paramserver/core/shard.py",
    "shared/clients/paramserver.py",
    "shared/compression/dense.py",
    "shared/compression/wire.py",
    "shared/grpc/server.py",
    "shared/grpc/channel.py",
    "shared/grpc/interceptors.py",
)
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
# While a server starts, retry connecting every 100 ms rather than with gRPC's growing backoff (1 s, 1.6 s, ...).
_PROBE_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 200)]


# Results ----------------------------------------------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    client_cpu_seconds: float
    server_cpu_seconds: float


@dataclass
class Transfer:
    """Every run of one transfer (say the 2-shard push); the figures are the best run's."""

    size_bytes: int
    runs: list[Run] = field(default_factory=list)

    @property
    def best(self) -> Run:
        return min(self.runs, key=lambda r: r.seconds)

    @property
    def gbps(self) -> float:
        return self.size_bytes / self.best.seconds / GB

    def to_json(self) -> dict[str, Any]:
        return {
            "best_seconds": round(self.best.seconds, 4),
            "gb_per_s": round(self.gbps, 3),
            "client_cpu_seconds": round(self.best.client_cpu_seconds, 2),
            "server_cpu_seconds": round(self.best.server_cpu_seconds, 2),
            "runs": [
                {
                    "seconds": round(r.seconds, 4),
                    "gb_per_s": round(self.size_bytes / r.seconds / GB, 3),
                    "client_cpu_seconds": round(r.client_cpu_seconds, 2),
                    "server_cpu_seconds": round(r.server_cpu_seconds, 2),
                }
                for r in self.runs
            ],
        }


def combined_gbps(push: Transfer, pull: Transfer) -> float:
    """Push plus pull bytes over the best push plus the best pull time."""
    return (push.size_bytes + pull.size_bytes) / (push.best.seconds + pull.best.seconds) / GB


class CpuMeter:
    """CPU seconds of this process and of some server processes over a ``with`` block."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.client = 0.0
        self.servers = 0.0

    def __enter__(self) -> CpuMeter:
        self.client = -time.process_time()
        self.servers = -sum(cpu_seconds(pid) for pid in self.pids)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client += time.process_time()
        with contextlib.suppress(OSError):
            self.servers += sum(cpu_seconds(pid) for pid in self.pids)


# The bare baseline server (runs in its own process) -----------------------------------------------------------


def _shares(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


async def bare_push(channels: list[grpc.aio.Channel], total: int, block: bytes, pids: list[int]) -> Run:
    """``total`` bytes up, split over one client stream per channel, all at once."""

    async def one(channel: grpc.aio.Channel, size: int) -> int:
        async def messages() -> AsyncIterator[bytes]:
            sent = 0
            while sent < size:
                n = min(len(block), size - sent)
                yield block if n == len(block) else block[:n]
                sent += n

        reply = await channel.stream_unary(f"/{BARE_SERVICE}/Upload")(messages())
        return int(struct.unpack("<Q", reply)[0])

    with CpuMeter(pids) as cpu:
        started = time.perf_counter()
        got = await asyncio.wait_for(
            asyncio.gather(*(one(c, s) for c, s in zip(channels, _shares(total, len(channels)), strict=True))),
            TRANSFER_TIMEOUT_S,
        )
        seconds = time.perf_counter() - started
    assert sum(got) == total, (sum(got), total)
    return Run(seconds, cpu.client, cpu.servers)


async def bare_pull(channels: list[grpc.aio.Channel], total: int, pids: list[int]) -> Run:
    """``total`` bytes down, split over one server stream per channel, all at once."""

    async def one(channel: grpc.aio.Channel, size: int) -> int:
        received = 0
        async for chunk in channel.unary_stream(f"/{BARE_SERVICE}/Download")(struct.pack("<QQ", size, CHUNK_BYTES)):
            received += len(chunk)
        return received

    with CpuMeter(pids) as cpu:
        started = time.perf_counter()
        got = await asyncio.wait_for(
            asyncio.gather(*(one(c, s) for c, s in zip(channels, _shares(total, len(channels)), strict=True))),
            TRANSFER_TIMEOUT_S,
        )
        seconds = time.perf_counter() - started
    assert sum(got) == total, (sum(got), total)
    return Run(seconds, cpu.client, cpu.servers)


# The parameter server side ------------------------------------------------------------------------------------


async def wait_healthy(server: Server, target: str, timeout_s: float = START_TIMEOUT_S) -> None:
    """Polls grpc.health.v1 Check until the server answers SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(target, options=_PROBE_OPTIONS) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            server.check_alive()
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{server.name} not SERVING after {timeout_s}s:\n{server.log_tail()}")
            await asyncio.sleep(0.1)


def _server_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return env


def start_shards(count: int, workdir: Path, torch_threads: int | None = None) -> tuple[list[Server], list[str]]:
    """``count`` shard processes; ``torch_threads`` sets their OMP_NUM_THREADS (None: torch's default)."""
    servers: list[Server] = []
    targets: list[str] = []
    for index in range(count):
        target = f"127.0.0.1:{free_port()}"
        home = workdir / f"shard-{count}-{index}"
        home.mkdir()
        env = _server_env(
            {
                "MAAS_HOME": str(home),
                "MAAS_PARAMSERVER_ADDRESS": target,
                "MAAS_PARAMSERVER_METRICS_ADDRESS": "127.0.0.1:0",
                "MAAS_LOG_LEVEL": "warning",
                **({"OMP_NUM_THREADS": str(torch_threads)} if torch_threads else {}),
            }
        )
        log = workdir / f"shard-{count}-{index}.log"
        servers.append(Server(f"shard {index} of {count}", [sys.executable, "-m", "services.paramserver"], env, log))
        targets.append(target)
    return servers, targets


def shard_config(model: dict[str, Any], index: int, count: int) -> Any:
    from maas.paramserver.v1 import paramserver_pb2 as pb

    return pb.ShardConfig(
        job_id=JOB_ID,
        shard_index=index,
        num_shards=count,
        num_workers=1,
        consistency="asp",
        model=pb.ModelSpec(architecture="mlp", arguments_json=json.dumps(model), seed=0),
        optimizer=pb.OptimizerSpec(name="sgd", hyperparameters={"lr": 0.0}),
        checkpoint_interval=0,
    )


def encode_gradients(plan: Any) -> tuple[list[dict[str, Any]], float]:
    """Piece key -> Encoded (codec ``none``) per shard, for a zero gradient; and the seconds it took."""
    import torch

    from shared.compression import get_codec

    started = time.perf_counter()
    zeros = torch.zeros(max(p.numel for p in plan.pieces), dtype=torch.float32)
    encoder = get_codec("none").encoder()
    per_shard: list[dict[str, Any]] = [{} for _ in range(plan.num_shards)]
    for piece in plan.pieces:
        per_shard[piece.shard][piece.key] = encoder.encode(piece.key, zeros[: piece.numel])
    return per_shard, time.perf_counter() - started


async def ps_push(clients: list[Any], encoded: list[dict[str, Any]], step: int, total: int, pids: list[int]) -> Run:
    with CpuMeter(pids) as cpu:
        started = time.perf_counter()
        results = await asyncio.wait_for(
            asyncio.gather(*(c.push(JOB_ID, 0, step, e) for c, e in zip(clients, encoded, strict=True))),
            TRANSFER_TIMEOUT_S,
        )
        seconds = time.perf_counter() - started
    received = sum(r.bytes_received for r in results)
    assert received == total and not any(r.duplicate for r in results), (received, total, results)
    return Run(seconds, cpu.client, cpu.servers)


async def ps_pull(clients: list[Any], step: int, pieces: int, total: int, pids: list[int]) -> Run:
    with CpuMeter(pids) as cpu:
        started = time.perf_counter()
        results = await asyncio.wait_for(
            asyncio.gather(*(c.pull(JOB_ID, 0, step, {}, "") for c in clients)), TRANSFER_TIMEOUT_S
        )
        seconds = time.perf_counter() - started
    got = sum(len(r.tensors) for r in results)
    received = sum(r.bytes_received for r in results)
    assert got == pieces and received == total, (got, pieces, received, total)
    del results  # 400 MB of tensors: gone before the next transfer
    return Run(seconds, cpu.client, cpu.servers)


# Main ----------------------------------------------------------------------------------------------------------


def code_fingerprint() -> dict[str, str | None]:
    digests: dict[str, str | None] = {}
    for name in CODE_PATH:
        path = REPO / name
        digests[name] = hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.exists() else None
    return digests


async def shard_block(
    count: int,
    model: dict[str, Any],
    runs: int,
    workdir: Path,
    bare: list[Server],
    bare_channels: list[grpc.aio.Channel],
    block: bytes,
    shard_threads: int | None,
) -> dict[str, Any]:
    """Everything measured with ``count`` shards: its parameter-server transfers and the bare ones beside them."""
    from shared.clients.paramserver import ParamServerClient, plan_for_job
    from shared.settings import CommonSettings

    print(f"{count} shard(s): starting ...", flush=True)
    started = time.perf_counter()
    servers, targets = start_shards(count, workdir, shard_threads)
    clients: list[ParamServerClient] = []
    try:
        await asyncio.gather(*(wait_healthy(s, t, START_TIMEOUT_S) for s, t in zip(servers, targets, strict=True)))
        settings = CommonSettings(max_message_bytes=MAX_MESSAGE_BYTES)
        clients = [ParamServerClient.connect(t, settings) for t in targets]
        configs = [shard_config(model, i, count) for i in range(count)]
        inits = await asyncio.gather(
            *(c.init_shard(cfg, timeout=INIT_TIMEOUT_S) for c, cfg in zip(clients, configs, strict=True))
        )
        plan = plan_for_job(configs[0])
        assert all(i.plan_fingerprint == plan.fingerprint() for i in inits), "the shards computed another plan"
        setup_s = time.perf_counter() - started
        total = sum(p.numel for p in plan.pieces) * 4
        encoded, encode_s = encode_gradients(plan)
        shard_rss = [round(rss_mib(s.pid), 1) for s in servers]
        print(
            f"  ready in {setup_s:.1f}s: {len(plan.pieces)} pieces, {total / GB:.3f} GB, shard bytes "
            f"{[round(b / GB, 3) for b in plan.shard_bytes()]}, shard RSS {shard_rss} MiB; encoded in {encode_s:.2f}s",
            flush=True,
        )
        pids = [s.pid for s in servers]
        names = ["ps_push", "ps_pull", "bare1_push", "bare1_pull"]
        if count > 1:
            names += ["bareN_push", "bareN_pull"]
        results = {name: Transfer(total) for name in names}
        bare1_pids, bare_n_pids = [bare[0].pid], [b.pid for b in bare[:count]]
        for i in range(runs):
            run = await bare_push(bare_channels[:1], total, block, bare1_pids)
            _report(results, "bare1_push", "bare push, 1 stream", i, run)
            run = await bare_pull(bare_channels[:1], total, bare1_pids)
            _report(results, "bare1_pull", "bare pull, 1 stream", i, run)
            run = await ps_push(clients, encoded, i, total, pids)
            _report(results, "ps_push", f"ps push, {count} shard(s)", i, run)
            run = await ps_pull(clients, i + 1, len(plan.pieces), total, pids)
            _report(results, "ps_pull", f"ps pull, {count} shard(s)", i, run)
            if count > 1:
                run = await bare_push(bare_channels[:count], total, block, bare_n_pids)
                _report(results, "bareN_push", f"bare push, {count} streams", i, run)
                run = await bare_pull(bare_channels[:count], total, bare_n_pids)
                _report(results, "bareN_pull", f"bare pull, {count} streams", i, run)
        for server in servers:
            server.check_alive()
        shard_rss_after = [round(rss_mib(s.pid), 1) for s in servers]
        del encoded
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
        for server in servers:
            server.stop()
    ps = combined_gbps(results["ps_push"], results["ps_pull"])
    bare1 = combined_gbps(results["bare1_push"], results["bare1_pull"])
    block_json: dict[str, Any] = {
        "shards": count,
        "pieces": len(plan.pieces),
        "bytes": total,
        "shard_bytes": plan.shard_bytes(),
        "setup_seconds": round(setup_s, 1),
        "encode_seconds": round(encode_s, 3),
        "shard_rss_mib_after_init": shard_rss,
        "shard_rss_mib_after_runs": shard_rss_after,
        "ps": {
            "push": results["ps_push"].to_json(),
            "pull": results["ps_pull"].to_json(),
            "combined_gb_per_s": round(ps, 3),
        },
        "bare_1_stream": {
            "push": results["bare1_push"].to_json(),
            "pull": results["bare1_pull"].to_json(),
            "combined_gb_per_s": round(bare1, 3),
        },
        "ratios": {
            "push": round(results["ps_push"].gbps / results["bare1_push"].gbps, 3),
            "pull": round(results["ps_pull"].gbps / results["bare1_pull"].gbps, 3),
            "combined": round(ps / bare1, 3),
        },
    }
    if count > 1:
        bare_n = combined_gbps(results["bareN_push"], results["bareN_pull"])
        block_json[f"bare_{count}_streams"] = {
            "push": results["bareN_push"].to_json(),
            "pull": results["bareN_pull"].to_json(),
            "combined_gb_per_s": round(bare_n, 3),
        }
        block_json["ratios_to_bare_n_streams"] = {
            "push": round(results["ps_push"].gbps / results["bareN_push"].gbps, 3),
            "pull": round(results["ps_pull"].gbps / results["bareN_pull"].gbps, 3),
            "combined": round(ps / bare_n, 3),
        }
    return block_json


def _report(results: dict[str, Transfer], key: str, label: str, index: int, run: Run) -> None:
    transfer = results[key]
    transfer.runs.append(run)
    print(
        f"  {label} #{index + 1}: {run.seconds:.3f}s = {transfer.size_bytes / run.seconds / GB:.2f} GB/s "
        f"(client CPU {run.client_cpu_seconds:.2f}s, server CPU {run.server_cpu_seconds:.2f}s)",
        flush=True,
    )


async def benchmark(
    model: dict[str, Any], shard_counts: list[int], runs: int, workdir: Path, shard_threads: int | None
) -> dict[str, Any]:
    load_start = os.getloadavg()
    bare_count = max(shard_counts)
    bare: list[Server] = []
    bare_channels: list[grpc.aio.Channel] = []
    blocks: list[dict[str, Any]] = []
    try:
        print(f"starting {bare_count} bare grpc.aio server(s) ...", flush=True)
        for index in range(bare_count):
            target = f"127.0.0.1:{free_port()}"
            # The registry benchmark's bare server: the same discard-upload and block-download methods.
            argv = [
                sys.executable,
                "-m",
                "benchmarks.registry_transfer",
                "--serve-bare",
                target,
                "--spool",
                str(workdir),
            ]
            bare.append(Server(f"bare server {index}", argv, _server_env({}), workdir / f"bare-{index}.log"))
            bare_channels.append(grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS))
        for server, channel in zip(bare, bare_channels, strict=True):
            await wait_ready(server, channel)
        block = os.urandom(CHUNK_BYTES)
        for count in shard_counts:
            blocks.append(await shard_block(count, model, runs, workdir, bare, bare_channels, block, shard_threads))
        for server in bare:
            server.check_alive()
    finally:
        for channel in bare_channels:
            await channel.close()
        for server in bare:
            server.stop()
    params = blocks[0]["bytes"] // 4
    return {
        "benchmark": "paramserver",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "network": "loopback (127.0.0.1), plaintext",
            # Other work on the machine skews every figure: the 1/5/15-minute load at the start and the end.
            "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
        },
        "code": code_fingerprint(),
        "model": {"architecture": "mlp", "arguments": model, "parameters": params, "bytes": params * 4},
        "codec": "none",
        "torch_threads": {
            "client": _torch_threads(),
            "shards": shard_threads or os.environ.get("OMP_NUM_THREADS") or f"torch default ({os.cpu_count()})",
        },
        "chunk_bytes": CHUNK_BYTES,
        "runs_per_transfer": runs,
        "target_ratio": TARGET_RATIO,
        "blocks": blocks,
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def print_table(result: dict[str, Any]) -> None:
    m = result["model"]
    print()
    print(
        f"parameter server, mlp {m['parameters'] / 1e6:.1f}M fp32 params ({m['bytes'] / GB:.3f} GB), codec none, "
        f"best of {result['runs_per_transfer']}, {result['machine']['cpus']} CPUs, loopback; GB/s = 10^9 B/s; "
        f"torch threads: client {result['torch_threads']['client']}, shards {result['torch_threads']['shards']}"
    )
    header = (
        f"{'shards':>6} {'ps push':>8} {'ps pull':>8} {'ps both':>8} {'bare push':>10} {'bare pull':>10} "
        f"{'bare both':>10} {'ratio push':>11} {'ratio pull':>11} {'ratio both':>11} {'target':>7} "
        f"{'bare xN both':>13} {'ps/bare xN':>11}"
    )
    print(header)
    print("-" * len(header))
    for b in result["blocks"]:
        ps, bare, r = b["ps"], b["bare_1_stream"], b["ratios"]
        bare_n = b.get(f"bare_{b['shards']}_streams")
        ratio_n = b.get("ratios_to_bare_n_streams")
        print(
            f"{b['shards']:>6} {ps['push']['gb_per_s']:>8.2f} {ps['pull']['gb_per_s']:>8.2f} "
            f"{ps['combined_gb_per_s']:>8.2f} {bare['push']['gb_per_s']:>10.2f} {bare['pull']['gb_per_s']:>10.2f} "
            f"{bare['combined_gb_per_s']:>10.2f} {r['push']:>11.2f} {r['pull']:>11.2f} {r['combined']:>11.2f} "
            f"{'met' if r['combined'] >= result['target_ratio'] else 'MISSED':>7} "
            f"{(format(bare_n['combined_gb_per_s'], '.2f') if bare_n else '-'):>13} "
            f"{(format(ratio_n['combined'], '.2f') if ratio_n else '-'):>11}"
        )
    print(
        f"target: ps / bare (one stream, same run) >= {result['target_ratio']}; 'bare xN' splits the same bytes "
        f"over N bare server processes"
    )
    cpu = ", ".join(
        f"{b['shards']} shard(s) push {b['ps']['push']['client_cpu_seconds']:.2f}/"
        f"{b['ps']['push']['server_cpu_seconds']:.2f}, pull {b['ps']['pull']['client_cpu_seconds']:.2f}/"
        f"{b['ps']['pull']['server_cpu_seconds']:.2f}"
        for b in result["blocks"]
    )
    print(f"CPU s client/shards (best runs): {cpu}")
    print(
        f"shard RSS after init (MiB): {', '.join(str(b['shard_rss_mib_after_init']) for b in result['blocks'])}; "
        f"{result['machine']['cpus']} CPUs shared by the client, the shards and the bare servers: more shards "
        f"cannot add CPU here"
    )
    print(
        f"load average (1 min) at start {result['machine']['load_average_start'][0]}, "
        f"at end {result['machine']['load_average_end'][0]} (other processes share the CPUs)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.paramserver", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 12.6M-parameter model (a quick check)")
    parser.add_argument("--runs", type=int, default=3, help="runs per transfer; the best is kept (default 3)")
    parser.add_argument(
        "--shards", type=int, nargs="+", default=list(SHARD_COUNTS), help="shard counts (default 1 2 4)"
    )
    parser.add_argument(
        "--client-torch-threads",
        type=int,
        default=1,
        help="torch threads of this process, the worker (default 1, as MAAS_TRAINING_TORCH_THREADS)",
    )
    parser.add_argument(
        "--shard-torch-threads",
        type=int,
        help="OMP_NUM_THREADS of the shard processes (default: unset, torch uses every core)",
    )
    parser.add_argument("--output", type=Path, help=f"JSON results (default {RESULTS}; --quick: {QUICK_RESULTS})")
    args = parser.parse_args(argv)
    if args.runs < 1 or any(n < 1 for n in args.shards) or args.client_torch_threads < 1:
        parser.error("--runs, --shards and --client-torch-threads must be positive")
    if args.shard_torch_threads is not None and args.shard_torch_threads < 1:
        parser.error("--shard-torch-threads must be positive")
    import torch

    torch.set_num_threads(args.client_torch_threads)
    model = QUICK_MODEL if args.quick else MODEL
    output = args.output or (QUICK_RESULTS if args.quick else RESULTS)
    workdir = Path(tempfile.mkdtemp(prefix="maas-bench-ps-"))
    started = time.perf_counter()
    try:
        result = asyncio.run(benchmark(model, args.shards, args.runs, workdir, args.shard_torch_threads))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    print_table(result)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output} ({result['wall_seconds']}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
