"""What artifact trust costs: ``python -m benchmarks.artifact_trust [--size-mib N] [--rounds N] [--load-rounds N]``.

1. Registry upload and download of one artifact (default 256 MiB; ``--size-mib 1024`` for the issue's 1 GiB,
   which needs about 3 GiB free under /tmp) through two registries started in this process on port 0, one
   with encryption at rest (``MAAS_REGISTRY_ENCRYPTION``) and one without, taking turns for ``--rounds``
   rounds; figures are the best of the rounds (the machine is shared and noisy). A download verifies the
   digest on the registry (alongside the stream) and on the client, in both. Target: encrypted >= 0.8 of
   unencrypted, both ways.
2. Worker load time with verification: the worker's LoadModel RPC (GetVersion, download or cache, module
   build, weights, warm-up) of the version, with verification (``require_signature`` with a trusted key's
   signature; a download hashed as it arrives, a cached copy re-hashed alongside its load) and without it
   (the same worker with its artifact source's hashing and signature check taken out), taking turns; a
   first load (empty cache) and a load from the cache, best of the rounds each. Target: what verification
   adds < 10% of load time.

Written to ``benchmarks/results/artifact_trust.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from benchmarks.registry_transfer import build_artifact

MiB = 1024 * 1024
MB = 1e6
RESULTS = Path(__file__).resolve().parent / "results"


async def _registry(home: Path, encryption: bool) -> Any:
    from services.registry.main import start
    from services.registry.settings import RegistrySettings

    settings = RegistrySettings(
        home=home,
        registry_address="127.0.0.1:0",
        registry_metrics_address="127.0.0.1:0",
        registry_encryption=encryption,
        shutdown_grace_s=1.0,
    )
    return await start(settings), settings


async def transfer(workdir: Path, artifact: Path, manifest_json: str, encryption: bool, tag: str) -> dict[str, float]:
    from maas.registry.v1 import registry_pb2 as pb

    from shared.clients.registry import RegistryClient

    running, settings = await _registry(workdir / f"registry-{'on' if encryption else 'off'}", encryption)
    client = RegistryClient.connect(f"127.0.0.1:{running.port}", settings)
    size = artifact.stat().st_size
    try:
        started = time.perf_counter()
        version = await client.upload_file(f"bench-{tag}", artifact, manifest_json, chunk_bytes=MiB)
        upload_s = time.perf_counter() - started
        dest = workdir / f"down-{tag}.safetensors"
        started = time.perf_counter()
        await client.download_file(pb.VersionRef(model=version.model, version=str(version.number)), dest)
        download_s = time.perf_counter() - started
        dest.unlink()
    finally:
        await client.close()
        await running.server.stop(0.5)
    return {"upload_mb_per_s": size / upload_s / MB, "download_mb_per_s": size / download_s / MB}


def _unverified_source(source: Any) -> Any:
    """The worker's registry source with verification taken out: the "off" side of the comparison only.

    A cached copy is loaded without a re-hash, a download is written without a hash, and no signature is
    checked. Everything else (GetVersion, the cache and its lock, the load, the warm-up) is the worker's own.
    """
    from maas.registry.v1 import registry_pb2 as pb

    from services.inference.adapters.registry_source import RegistryArtifactSource
    from services.inference.core.host import FetchedArtifact

    class Unverified(RegistryArtifactSource):
        async def _check_signatures(self, info: pb.Version) -> tuple[tuple[str, ...], str]:
            return (), "verification is off"

        async def _download(self, ref: pb.VersionRef, dest: Path, digest: str) -> None:
            with dest.open("wb") as fh:
                async for message in self.client.stub.DownloadVersion(pb.DownloadVersionRequest(ref=ref)):
                    if not message.HasField("version"):
                        await asyncio.to_thread(fh.write, message.chunk)

        @contextlib.asynccontextmanager
        async def fetch(self, model: str, version: int) -> AsyncIterator[FetchedArtifact]:
            async with super().fetch(model, version) as artifact:
                yield dataclasses.replace(artifact, recheck=None)

    return Unverified(source.client, source.cache_dir)


async def worker_load(workdir: Path, artifact: Path, manifest_json: str, rounds: int) -> dict[str, Any]:
    """The worker's LoadModel RPC (GetVersion, download or cache, build, load, warm-up), verification on and
    off, taking turns: a first load (empty cache) and a load from the cache; best of ``rounds`` each."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from maas.inference.v1 import worker_pb2 as wpb
    from maas.inference.v1 import worker_pb2_grpc
    from maas.registry.v1 import registry_pb2 as pb

    from services.inference.main import hosted
    from shared.artifacts import signing
    from shared.clients.registry import RegistryClient
    from shared.grpc.channel import make_channel

    running, settings = await _registry(workdir / "registry-load", True)
    client = RegistryClient.connect(f"127.0.0.1:{running.port}", settings)
    key = ec.generate_private_key(ec.SECP256R1())
    key_path = workdir / "signing.pem"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    worker = None
    try:
        version = await client.upload_file("bench-load", artifact, manifest_json)
        ref = pb.VersionRef(model="bench-load", version=str(version.number))
        await client.sign_file(ref, artifact, key_path)
        public = signing.public_key_of(key_path).decode()
        await client.add_trusted_key("bench", public)
        worker = await hosted(
            {
                "home": workdir / "worker",
                "inference_registry_address": f"127.0.0.1:{running.port}",
                "inference_device": "cpu",
                "inference_memory_budget_bytes": 8 * artifact.stat().st_size,
                "inference_warmup": True,
            }
        )
        verified, unverified = worker.host.source, _unverified_source(worker.host.source)
        cache = worker.host.source.cache_dir / f"{version.sha256}.safetensors"
        channel = make_channel(f"127.0.0.1:{worker.port}", settings)
        stub = worker_pb2_grpc.InferenceWorkerStub(channel)
        model_ref = wpb.ModelRef(model="bench-load", version=version.number)

        async def timed_load(verify: bool, first: bool) -> float:
            worker.host.source = verified if verify else unverified
            if first:
                await asyncio.to_thread(cache.unlink, missing_ok=True)
            started = time.perf_counter()
            request = wpb.LoadModelRequest(ref=model_ref, require_signature=verify)
            loaded = (await stub.LoadModel(request, timeout=600)).model
            elapsed = time.perf_counter() - started
            assert bool(loaded.signers) == verify, loaded
            await stub.UnloadModel(wpb.UnloadModelRequest(ref=model_ref))
            return elapsed

        times: dict[str, list[float]] = {}
        for index in range(rounds):
            for first in (True, False):
                order = (True, False) if index % 2 == 0 else (False, True)
                for verify in order:
                    name = f"{'first' if first else 'cached'}_load_{'verified' if verify else 'unverified'}_s"
                    # The cached loads start from the copy the last first load downloaded.
                    times.setdefault(name, []).append(await timed_load(verify, first))
        await channel.close()
        started = time.perf_counter()
        bundle = signing.sign_file(artifact, key_path)
        signature_s = time.perf_counter() - started  # signing also hashes: an upper bound of the check
        started = time.perf_counter()
        signing.verify_with_key(bundle, public.encode())
        verify_s = time.perf_counter() - started
    finally:
        if worker is not None:
            await worker.stop(0.5)
        await client.close()
        await running.server.stop(0.5)
    best = {name: min(values) for name, values in times.items()}
    figures: dict[str, Any] = {name: round(value, 3) for name, value in best.items()}
    figures["all_s"] = {name: [round(v, 3) for v in values] for name, values in times.items()}
    figures["signature_check_s"] = round(verify_s, 4)
    figures["signing_s"] = round(signature_s, 3)
    for kind in ("first", "cached"):
        on, off = best[f"{kind}_load_verified_s"], best[f"{kind}_load_unverified_s"]
        # What verification adds to the worker's load, as a share of the verified load.
        figures[f"verification_fraction_of_{kind}_load"] = round(max(0.0, on - off) / on, 3)
    return figures


async def run(size_mib: int, rounds: int, load_rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="maas-artifact-trust-") as tmp:
        workdir = Path(tmp)
        artifact = workdir / "model.safetensors"
        manifest_json, size, _ = await asyncio.to_thread(build_artifact, size_mib, artifact)
        print(f"artifact: {size / MiB:.0f} MiB", flush=True)
        best: dict[str, dict[str, float]] = {"off": {}, "on": {}}
        for index in range(rounds):
            order = (False, True) if index % 2 == 0 else (True, False)
            for encryption in order:
                name = "on" if encryption else "off"
                figures = await transfer(workdir, artifact, manifest_json, encryption, f"{name}-{index}")
                print(
                    f"round {index + 1}/{rounds} encryption {name:3}: upload {figures['upload_mb_per_s']:7.1f} MB/s  "
                    f"download {figures['download_mb_per_s']:7.1f} MB/s",
                    flush=True,
                )
                for key, value in figures.items():
                    best[name][key] = max(best[name].get(key, 0.0), value)
        load = await worker_load(workdir, artifact, manifest_json, load_rounds)
    ratios = {
        key.replace("_mb_per_s", "_encrypted_over_plain"): round(best["on"][key] / best["off"][key], 3)
        for key in best["off"]
    }
    return {
        "size_bytes": size,
        "rounds": rounds,
        "encryption_off": {k: round(v, 1) for k, v in best["off"].items()},
        "encryption_on": {k: round(v, 1) for k, v in best["on"].items()},
        "ratios": ratios,
        "worker_load": load,
        "targets": {
            "encrypted_at_least_0_8": all(v >= 0.8 for v in ratios.values()) if ratios else None,
            "verification_under_10_percent_of_first_load": load["verification_fraction_of_first_load"] < 0.10,
            "verification_under_10_percent_of_cached_load": load["verification_fraction_of_cached_load"] < 0.10,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256, help="Artifact size (the issue asks 1024).")
    parser.add_argument("--rounds", type=int, default=2, help="Rounds of both registries (best of rounds; 0: skip).")
    parser.add_argument("--load-rounds", type=int, default=3, help="Rounds of worker loads, verified and not.")
    args = parser.parse_args()
    report = asyncio.run(run(args.size_mib, args.rounds, args.load_rounds))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "artifact_trust.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
