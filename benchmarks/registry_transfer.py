"""Registry upload/download throughput and memory against a bare grpc.aio baseline, on loopback.

Run ``python -m benchmarks.registry_transfer`` (``make bench``); ``--quick`` moves 128 MiB instead of 1 GiB.
In one run it:

1. builds a valid ``mlp`` safetensors artifact of about the requested size (4096x4096 float32 layers of
   64 MiB each) with ``shared.artifacts``;
2. starts the real registry (``python -m services.registry``) on a free loopback port with a throwaway
   MAAS_HOME, and a bare grpc.aio server (generic handlers, no interceptors, no protobuf: a client-streaming
   method that counts and discards the bytes, and a server-streaming method that sends a preallocated
   block) in a second process;
3. uploads and downloads the artifact through both, each transfer ``--runs`` times (best kept), alternating
   registry and bare so that machine noise hits both alike, with 1 MiB chunks on both, after ``sync`` so
   that no transfer pays for the previous one's writeback;
4. samples the registry process's VmRSS every 50 ms during each registry transfer (the bare server's too,
   for comparison), and takes each server's CPU time per transfer;
5. for context only, also times a bare upload whose server writes and fsyncs what it receives (the storage
   work every registry upload must do), a plain file copy with fsync, and sha256 of the artifact;
6. prints a table and writes ``benchmarks/results/registry_transfer.json``.

The targets are registry/bare >= 0.5 both ways and registry RSS growth < 100 MiB during a transfer.

Client side, the registry transfers go through ``shared.clients.registry.RegistryClient`` unchanged.
Its ``upload_file`` hashes the file before the RPC and ``download_file`` re-hashes it after the stream;
the bare baseline hashes nothing, so those hashing times are measured apart (by timing the client
module's ``sha256_file`` while the call runs) and left out of the registry MB/s. Both clients read the
upload from the same file and write (and fsync) the download to a file, so the client-side disk work is
the same on both sides. MB/s is 10**6 bytes per second.
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
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

MiB = 1024 * 1024
MB = 1_000_000
CHUNK_BYTES = 1024 * 1024
MAX_MESSAGE_BYTES = 8 * MiB
LAYER = 4096  # width of the mlp's square layers: 4096 * 4096 float32 = 64 MiB each
LAYER_MIB = LAYER * LAYER * 4 // MiB
MODEL = "bench-transfer"
RSS_INTERVAL_S = 0.05
TARGET_RATIO = 0.5
TARGET_RSS_GROWTH_MIB = 100.0
REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "registry_transfer.json"
# The files on the transfer path; their digests go into the results, to tie figures to a version of the code.
CODE_PATH = (
    "services/registry/api/servicer.py",
    "services/registry/core/service.py",
    "services/registry/core/pipeline.py",
    "services/registry/adapters/local_store.py",
    "shared/clients/registry.py",
    "shared/grpc/server.py",
    "shared/grpc/interceptors.py",
)
BARE_SERVICE = "bench.Bare"
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


# Memory sampling ------------------------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    """The process's resident set size (VmRSS) in MiB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process (all its threads) has used so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Samples a process's VmRSS from a thread every ``interval`` seconds while in the ``with`` block.

    Also takes the process's CPU time over the block, which tells a CPU-bound server from a waiting one.
    """

    def __init__(self, pid: int, interval: float = RSS_INTERVAL_S) -> None:
        self.pid = pid
        self.interval = interval
        self.baseline = 0.0
        self.peak = 0.0
        self.samples = 0
        self.cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)

    def _sample(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):  # the process may be gone at the very end
            self.peak = max(self.peak, rss_mib(self.pid))
            self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        self.baseline = self.peak = rss_mib(self.pid)
        self.cpu = -cpu_seconds(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        with contextlib.suppress(OSError):
            self.cpu += cpu_seconds(self.pid)

    @property
    def growth(self) -> float:
        return self.peak - self.baseline


# Results ----------------------------------------------------------------------------------------------------


@dataclass
class Run:
    seconds: float  # the transfer alone (no client-side hashing)
    hash_seconds: float = 0.0  # client-side sha256: before an upload, verification after a download
    rss_baseline_mib: float | None = None
    rss_peak_mib: float | None = None
    server_cpu_seconds: float | None = None

    @property
    def rss_growth_mib(self) -> float | None:
        if self.rss_baseline_mib is None or self.rss_peak_mib is None:
            return None
        return self.rss_peak_mib - self.rss_baseline_mib


@dataclass
class Transfer:
    """Every run of one transfer (say registry upload); the figures are the best run's."""

    size_bytes: int
    runs: list[Run] = field(default_factory=list)

    @property
    def best(self) -> Run:
        return min(self.runs, key=lambda r: r.seconds)

    @property
    def mbps(self) -> float:
        return self.size_bytes / self.best.seconds / MB

    @property
    def worst_rss(self) -> Run:
        """The run with the largest RSS growth: a memory target is about the worst case."""
        return max(self.runs, key=lambda r: r.rss_growth_mib or 0.0)

    def to_json(self) -> dict[str, Any]:
        worst = self.worst_rss
        return {
            "best_seconds": round(self.best.seconds, 4),
            "mb_per_s": round(self.mbps, 1),
            "client_hash_seconds": round(self.best.hash_seconds, 4),
            "mb_per_s_including_client_hash": round(
                self.size_bytes / (self.best.seconds + self.best.hash_seconds) / MB, 1
            ),
            "server_cpu_seconds": self.best.server_cpu_seconds,
            "server_rss_baseline_mib": _round(worst.rss_baseline_mib),
            "server_rss_peak_growth_mib": _round(worst.rss_growth_mib),
            "runs": [
                {
                    "seconds": round(r.seconds, 4),
                    "hash_seconds": round(r.hash_seconds, 4),
                    "rss_baseline_mib": _round(r.rss_baseline_mib),
                    "rss_peak_mib": _round(r.rss_peak_mib),
                    "rss_growth_mib": _round(r.rss_growth_mib),
                    "server_cpu_seconds": r.server_cpu_seconds,
                    "mb_per_s": round(self.size_bytes / r.seconds / MB, 1),
                }
                for r in self.runs
            ],
        }


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


# The bare baseline server (runs in its own process) -----------------------------------------------------------


async def _serve_bare(address: str, spool: Path) -> None:
    async def upload(request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        received = 0
        async for chunk in request_iterator:
            received += len(chunk)
        return struct.pack("<Q", received)

    async def upload_to_disk(request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        # The storage work every registry upload must do (write, fsync), minus hashing, checks and protobuf.
        received = 0
        path = spool / f"bare-upload-{os.getpid()}.bin"
        try:
            with path.open("wb") as fh:
                async for chunk in request_iterator:
                    fh.write(chunk)
                    received += len(chunk)
                fh.flush()
                os.fsync(fh.fileno())
        finally:
            path.unlink(missing_ok=True)
        return struct.pack("<Q", received)

    async def download(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        size, chunk_bytes = struct.unpack("<QQ", request)
        block = os.urandom(chunk_bytes)
        sent = 0
        while sent < size:
            n = min(chunk_bytes, size - sent)
            yield block if n == chunk_bytes else block[:n]
            sent += n

    handler = grpc.method_handlers_generic_handler(
        BARE_SERVICE,
        {
            "Upload": grpc.stream_unary_rpc_method_handler(upload),
            "UploadToDisk": grpc.stream_unary_rpc_method_handler(upload_to_disk),
            "Download": grpc.unary_stream_rpc_method_handler(download),
        },
    )
    server = grpc.aio.server(options=_CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(address) == 0:
        raise OSError(f"could not bind {address}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


# Client side ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def file_chunks(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(chunk_bytes):
            yield chunk


class Server:
    """A server subprocess: started, waited for, sampled, stopped with SIGTERM."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("wb")
        # Its own session: what the server starts (a scheduler's local Ray) shares its process group.
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


async def wait_healthy(
    server: Server, target: str, timeout_s: float = 120.0, credentials: grpc.ChannelCredentials | None = None
) -> None:
    """Polls grpc.health.v1 Check until the server answers SERVING (over TLS with ``credentials``)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    channel = grpc.aio.insecure_channel(target) if credentials is None else grpc.aio.secure_channel(target, credentials)
    async with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            server.check_alive()
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{server.name} not SERVING after {timeout_s}s:\n{server.log_tail()}")
            await asyncio.sleep(0.2)


async def wait_ready(server: Server, channel: grpc.aio.Channel, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        server.check_alive()
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout=1)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{server.name} not ready after {timeout_s}s:\n{server.log_tail()}") from None


@contextlib.contextmanager
def timed_client_hash() -> Iterator[list[float]]:
    """Times every ``sha256_file`` call the registry client makes inside the block (seconds, summed).

    ``RegistryClient.upload_file`` hashes before its RPC and ``download_file`` after its stream, both
    through the module's ``sha256_file``; timing it lets the transfer be timed without the hashing while
    the client's code runs unchanged.
    """
    from shared.clients import registry as client_module

    original: Callable[[Path], str] = client_module.sha256_file
    spent = [0.0]

    def timed(path: Path) -> str:
        started = time.perf_counter()
        try:
            return original(path)
        finally:
            spent[0] += time.perf_counter() - started

    client_module.sha256_file = timed
    try:
        yield spent
    finally:
        client_module.sha256_file = original


def settle() -> None:
    """Writes back dirty pages before a transfer, so that none pays for the previous one's writeback."""
    os.sync()


def _run(seconds: float, hash_seconds: float, sampler: RssSampler) -> Run:
    return Run(seconds, hash_seconds, sampler.baseline, sampler.peak, round(sampler.cpu, 2))


async def registry_upload(client: Any, artifact: Path, manifest_json: str, pid: int) -> Run:
    with timed_client_hash() as hashed, RssSampler(pid) as sampler:
        started = time.perf_counter()
        version = await client.upload_file(MODEL, artifact, manifest_json, chunk_bytes=CHUNK_BYTES)
        total = time.perf_counter() - started
    assert version.size_bytes == artifact.stat().st_size
    return _run(total - hashed[0], hashed[0], sampler)


async def registry_download(client: Any, version: str, dest: Path, size: int, pid: int) -> Run:
    from maas.registry.v1 import registry_pb2 as pb

    with timed_client_hash() as hashed, RssSampler(pid) as sampler:
        started = time.perf_counter()
        await client.download_file(pb.VersionRef(model=MODEL, version=version), dest, resume=False)
        total = time.perf_counter() - started
    assert dest.stat().st_size == size
    dest.unlink()
    return _run(total - hashed[0], hashed[0], sampler)


async def bare_upload(channel: grpc.aio.Channel, artifact: Path, pid: int, method: str = "Upload") -> Run:
    upload = channel.stream_unary(f"/{BARE_SERVICE}/{method}")

    async def messages() -> AsyncIterator[bytes]:
        for chunk in file_chunks(artifact):
            yield chunk

    with RssSampler(pid) as sampler:
        started = time.perf_counter()
        reply = await upload(messages())
        seconds = time.perf_counter() - started
    (received,) = struct.unpack("<Q", reply)
    assert received == artifact.stat().st_size, (received, artifact.stat().st_size)
    return _run(seconds, 0.0, sampler)


async def bare_download(channel: grpc.aio.Channel, size: int, dest: Path, pid: int) -> Run:
    download = channel.unary_stream(f"/{BARE_SERVICE}/Download")
    with RssSampler(pid) as sampler:
        started = time.perf_counter()
        with dest.open("wb") as fh:  # as RegistryClient.download_file does: write, flush, fsync
            async for chunk in download(struct.pack("<QQ", size, CHUNK_BYTES)):
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        seconds = time.perf_counter() - started
    assert dest.stat().st_size == size
    dest.unlink()
    return _run(seconds, 0.0, sampler)


# Setup --------------------------------------------------------------------------------------------------------


def build_artifact(size_mib: int, path: Path) -> tuple[str, int, float]:
    """Writes an mlp artifact of about ``size_mib``; returns its manifest JSON, size and build seconds."""
    import torch

    from shared.artifacts import Manifest, build_model, save_artifact

    started = time.perf_counter()
    layers = max(1, round(size_mib / LAYER_MIB))
    manifest = Manifest.for_model("mlp", {"in_features": LAYER, "hidden": [LAYER] * layers, "out_features": 10})
    with torch.no_grad():
        model = build_model(manifest)  # CPU; randomly initialised, so the bytes do not compress
        save_artifact(model, manifest, path)
    del model
    return manifest.to_json(), path.stat().st_size, time.perf_counter() - started


def disk_reference(source: Path, dest: Path) -> dict[str, float]:
    """Copies the artifact to a new file and fsyncs it: what the registry's store does on every upload."""
    size = source.stat().st_size
    started = time.perf_counter()
    with dest.open("wb") as fh:
        for chunk in file_chunks(source):
            fh.write(chunk)
        written = time.perf_counter()
        fh.flush()
        os.fsync(fh.fileno())
    done = time.perf_counter()
    dest.unlink()
    from shared.clients.registry import sha256_file

    hash_started = time.perf_counter()
    sha256_file(source)
    hashed = time.perf_counter() - hash_started
    return {
        "write_seconds": round(written - started, 4),
        "fsync_seconds": round(done - written, 4),
        "write_fsync_mb_per_s": round(size / (done - started) / MB, 1),
        "sha256_seconds": round(hashed, 4),
        "sha256_mb_per_s": round(size / hashed / MB, 1),
    }


def code_fingerprint() -> dict[str, str | None]:
    """sha256 (first 12 hex digits) of each file on the transfer path; None for a missing file."""
    digests: dict[str, str | None] = {}
    for name in CODE_PATH:
        path = REPO / name
        digests[name] = hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.exists() else None
    return digests


def _server_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
    # Development mode unless the benchmark asks for the secure defaults (benchmarks.security_cost does).
    env["MAAS_INSECURE"] = os.environ.get("MAAS_INSECURE", "1")
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return env


# Main ----------------------------------------------------------------------------------------------------------


async def benchmark(size_mib: int, runs: int, workdir: Path) -> dict[str, Any]:
    from shared.clients.registry import RegistryClient
    from shared.settings import CommonSettings

    print(f"building a ~{size_mib} MiB mlp artifact ...", flush=True)
    artifact = workdir / "artifact.safetensors"
    manifest_json, size, build_s = build_artifact(size_mib, artifact)
    print(f"  {size / MiB:.1f} MiB in {build_s:.1f}s", flush=True)
    print("disk reference (copy + fsync, sha256) ...", flush=True)
    disk = disk_reference(artifact, workdir / "disk-reference.bin")

    registry_port, bare_port = free_port(), free_port()
    registry_target, bare_target = f"127.0.0.1:{registry_port}", f"127.0.0.1:{bare_port}"
    home = workdir / "home"
    home.mkdir()
    registry = Server(
        "registry",
        [sys.executable, "-m", "services.registry"],
        _server_env(
            {
                "MAAS_HOME": str(home),
                "MAAS_REGISTRY_ADDRESS": registry_target,
                "MAAS_REGISTRY_METRICS_ADDRESS": "127.0.0.1:0",
                "MAAS_LOG_LEVEL": "warning",
                "MAAS_REGISTRY_MAX_ARTIFACT_BYTES": str(max(size * 4, 64 * 1024 * MiB)),
            }
        ),
        workdir / "registry.log",
    )
    bare = Server(
        "bare server",
        [sys.executable, "-m", "benchmarks.registry_transfer", "--serve-bare", bare_target, "--spool", str(workdir)],
        _server_env({}),
        workdir / "bare.log",
    )
    client = None
    bare_channel = None
    results = {
        name: Transfer(size)
        for name in ("registry_upload", "registry_download", "bare_upload", "bare_upload_to_disk", "bare_download")
    }
    try:
        print("starting the registry and the bare server ...", flush=True)
        await wait_healthy(registry, registry_target)
        bare_channel = grpc.aio.insecure_channel(bare_target, options=_CHANNEL_OPTIONS)
        await wait_ready(bare, bare_channel)
        client = RegistryClient.connect(registry_target, CommonSettings(max_message_bytes=MAX_MESSAGE_BYTES))
        download_dest = workdir / "download.safetensors"
        # Idle baselines, before any transfer (the registry has imported torch, the bare server has not).
        idle = {"registry_rss_mib": round(rss_mib(registry.pid), 1), "bare_rss_mib": round(rss_mib(bare.pid), 1)}
        # Uploads first (the downloads need a version); registry and bare alternate so noise hits both.
        for i in range(runs):
            settle()
            run = await bare_upload(bare_channel, artifact, bare.pid)
            results["bare_upload"].runs.append(run)
            _report("bare upload", i, size, run)
            settle()
            run = await registry_upload(client, artifact, manifest_json, registry.pid)
            results["registry_upload"].runs.append(run)
            _report("registry upload", i, size, run)
            settle()
            run = await bare_upload(bare_channel, artifact, bare.pid, "UploadToDisk")
            results["bare_upload_to_disk"].runs.append(run)
            _report("bare upload to disk", i, size, run)
        for i in range(runs):
            settle()
            run = await bare_download(bare_channel, size, download_dest, bare.pid)
            results["bare_download"].runs.append(run)
            _report("bare download", i, size, run)
            settle()
            run = await registry_download(client, "1", download_dest, size, registry.pid)
            results["registry_download"].runs.append(run)
            _report("registry download", i, size, run)
        registry.check_alive()
    finally:
        if client is not None:
            await client.close()
        if bare_channel is not None:
            await bare_channel.close()
        registry.stop()
        bare.stop()

    up = results["registry_upload"].mbps / results["bare_upload"].mbps
    down = results["registry_download"].mbps / results["bare_download"].mbps
    rss_up = results["registry_upload"].worst_rss.rss_growth_mib or 0.0
    rss_down = results["registry_download"].worst_rss.rss_growth_mib or 0.0
    return {
        "benchmark": "registry_transfer",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "network": "loopback (127.0.0.1), plaintext",
        },
        "code": code_fingerprint(),
        "artifact": {"size_bytes": size, "size_mib": round(size / MiB, 1), "build_seconds": round(build_s, 1)},
        "chunk_bytes": CHUNK_BYTES,
        "runs_per_transfer": runs,
        "rss_sample_interval_s": RSS_INTERVAL_S,
        "idle_rss": idle,
        "disk_reference": disk,
        "registry": {
            "upload": results["registry_upload"].to_json(),
            "download": results["registry_download"].to_json(),
        },
        "bare": {"upload": results["bare_upload"].to_json(), "download": results["bare_download"].to_json()},
        # Not a target: the bare server writing and fsyncing what it receives, as the registry must.
        "bare_upload_to_disk": results["bare_upload_to_disk"].to_json(),
        "upload_ratio_to_bare_to_disk": round(results["registry_upload"].mbps / results["bare_upload_to_disk"].mbps, 3),
        "ratios": {"upload": round(up, 3), "download": round(down, 3)},
        "targets": {
            "min_ratio": TARGET_RATIO,
            "max_rss_growth_mib": TARGET_RSS_GROWTH_MIB,
            "upload_ratio_met": up >= TARGET_RATIO,
            "download_ratio_met": down >= TARGET_RATIO,
            "upload_rss_met": rss_up < TARGET_RSS_GROWTH_MIB,
            "download_rss_met": rss_down < TARGET_RSS_GROWTH_MIB,
        },
    }


def _report(name: str, index: int, size: int, run: Run) -> None:
    extra = f", client sha256 {run.hash_seconds:.2f}s" if run.hash_seconds else ""
    rss = f", server RSS +{run.rss_growth_mib:.1f} MiB, server CPU {run.server_cpu_seconds:.2f}s"
    print(f"  {name} #{index + 1}: {run.seconds:.2f}s = {size / run.seconds / MB:.0f} MB/s{extra}{rss}", flush=True)


def print_table(result: dict[str, Any]) -> None:
    def ok(flag: bool) -> str:
        return "ok" if flag else "MISSED"

    def reg_cpu(side: str, direction: str) -> float:
        return result[side][direction]["server_cpu_seconds"] or 0.0

    t = result["targets"]
    art = result["artifact"]
    print()
    print(
        f"registry transfer, {art['size_mib']} MiB artifact, {result['chunk_bytes'] // 1024} KiB chunks, "
        f"best of {result['runs_per_transfer']}, {result['machine']['cpus']} CPUs, loopback"
    )
    header = (
        f"{'transfer':<10} {'registry MB/s':>14} {'bare MB/s':>10} {'ratio':>6} {'target':>7}  "
        f"{'client sha256 s':>15} {'registry RSS base/+peak MiB':>28} {'bare RSS +peak':>15}"
    )
    print(header)
    print("-" * len(header))
    for direction in ("upload", "download"):
        reg, bare = result["registry"][direction], result["bare"][direction]
        ratio = result["ratios"][direction]
        rss_ok = t[f"{direction}_rss_met"]
        rss = f"{reg['server_rss_baseline_mib']:.0f} / +{reg['server_rss_peak_growth_mib']:.1f} ({ok(rss_ok)})"
        print(
            f"{direction:<10} {reg['mb_per_s']:>14.0f} {bare['mb_per_s']:>10.0f} {ratio:>6.2f} "
            f"{ok(t[f'{direction}_ratio_met']):>7}  {reg['client_hash_seconds']:>15.2f} {rss:>28} "
            f"{'+' + format(bare['server_rss_peak_growth_mib'], '.1f'):>15}"
        )
    disk = result["disk_reference"]
    to_disk = result["bare_upload_to_disk"]
    print(f"targets: ratio >= {t['min_ratio']}, registry RSS growth < {t['max_rss_growth_mib']:.0f} MiB")
    print(
        f"context (not targets): bare upload that writes+fsyncs {to_disk['mb_per_s']:.0f} MB/s "
        f"(registry/that {result['upload_ratio_to_bare_to_disk']:.2f}); file copy+fsync "
        f"{disk['write_fsync_mb_per_s']:.0f} MB/s; sha256 {disk['sha256_mb_per_s']:.0f} MB/s; server CPU s "
        f"registry up/down {reg_cpu('registry', 'upload'):.2f}/{reg_cpu('registry', 'download'):.2f}, "
        f"bare {reg_cpu('bare', 'upload'):.2f}/{reg_cpu('bare', 'download'):.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.registry_transfer", description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="artifact size in MiB (default 1024)")
    parser.add_argument("--quick", action="store_true", help="a 128 MiB artifact (a quick check)")
    parser.add_argument("--runs", type=int, default=2, help="runs per transfer; the best is kept (default 2)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    parser.add_argument("--serve-bare", metavar="ADDRESS", help=argparse.SUPPRESS)
    parser.add_argument("--spool", type=Path, default=Path(tempfile.gettempdir()), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_bare:
        asyncio.run(_serve_bare(args.serve_bare, args.spool))
        return 0
    size_mib = 128 if args.quick else args.size_mib
    if size_mib < 1 or args.runs < 1:
        parser.error("--size-mib and --runs must be positive")
    workdir = Path(tempfile.mkdtemp(prefix="maas-bench-"))
    started = time.perf_counter()
    try:
        result = asyncio.run(benchmark(size_mib, args.runs, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    print_table(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output} ({result['wall_seconds']}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
