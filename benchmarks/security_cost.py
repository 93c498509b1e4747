"""What the secure defaults cost: ``python -m benchmarks.security_cost [--quick] [--rounds N]``.

The same mesh (registry, scheduler with a local Ray, gateway, one MLP replica) twice in one run: with the
defaults (TLS to the gateway with an API key checked on every call, mutual TLS from the gateway to the
worker) and with ``MAAS_INSECURE`` (plaintext, no authentication). Each is driven by the same closed-loop
client at concurrency 1, 8 and 32; the meshes take turns for ``--rounds`` rounds (runs on this VM vary by
more than the effect), and the figures are the medians over rounds. Target: under 10% throughput lost at
c=32. Written to ``benchmarks/results/security_cost.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.serving import BATCHING, Plan, build_artifacts, infer_request, mlp_input
from benchmarks.serving_load import Point, closed_loop, machine_busy_seconds
from benchmarks.serving_mesh import Mesh

CONCURRENCY = (1, 8, 32)
RESULTS = Path(__file__).resolve().parent / "results"


async def measure(secure: bool, workdir: Path, plan: Plan) -> dict[int, Point]:
    """Start one mesh, deploy the MLP, drive it at each concurrency, stop it."""
    from inference import grpc_service_pb2_grpc

    models = build_artifacts(workdir)
    mesh = Mesh(workdir / ("secure" if secure else "insecure"), secure=secure)
    points: dict[int, Point] = {}
    try:
        await mesh.start()
        path, manifest_json, _ = models["mlp"]
        await mesh.push("mlp", path, manifest_json)
        await mesh.deploy("mlp", BATCHING)
        channel, metadata = mesh.gateway_channel()
        async with channel:
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = infer_request("mlp", "input", mlp_input(1))
            for c in CONCURRENCY:
                point = Point("secure" if secure else "insecure", "mlp", c)
                await closed_loop(
                    point,
                    lambda: stub.ModelInfer(request, timeout=30, metadata=metadata),
                    plan.requests[c],
                    plan.warmup,
                    plan.time_cap_s,
                    machine_busy_seconds,
                )
                figures = point.to_json()
                print(
                    f"  {point.system:9} c={c:<3} {point.throughput:8.1f} req/s  p50 {figures['p50_ms']} ms  "
                    f"p99 {figures['p99_ms']} ms  errors {point.errors}",
                    flush=True,
                )
                points[c] = point
    finally:
        await mesh.stop()
    return points


def summarize(rounds: list[dict[str, dict[int, Point]]]) -> dict[str, Any]:
    """Medians over rounds per system and concurrency, and the secure/insecure ratios."""
    summary: dict[str, Any] = {}
    for c in CONCURRENCY:
        row: dict[str, Any] = {}
        for system in ("insecure", "secure"):
            points = [r[system][c] for r in rounds]
            row[system] = {
                "requests_per_s": round(statistics.median(p.throughput for p in points), 1),
                "p50_ms": round(statistics.median(p.percentile(50) or 0.0 for p in points), 3),
                "p99_ms": round(statistics.median(p.percentile(99) or 0.0 for p in points), 3),
                "errors": sum(p.errors for p in points),
            }
        row["throughput_secure_over_insecure"] = round(
            row["secure"]["requests_per_s"] / row["insecure"]["requests_per_s"], 3
        )
        row["p50_secure_over_insecure"] = round(row["secure"]["p50_ms"] / row["insecure"]["p50_ms"], 3)
        summary[f"c={c}"] = row
    loss = 1 - summary["c=32"]["throughput_secure_over_insecure"]
    summary["target"] = {"c32_throughput_loss": round(loss, 3), "under_10_percent": loss < 0.10}
    return summary


async def run(plan: Plan, rounds: int) -> dict[str, Any]:
    results: list[dict[str, dict[int, Point]]] = []
    with tempfile.TemporaryDirectory(prefix="maas-security-cost-") as tmp:
        for index in range(rounds):
            # Alternate which mesh goes first: the machine warms up (caches, CPU frequency) over a run.
            order = (False, True) if index % 2 == 0 else (True, False)
            measured: dict[str, dict[int, Point]] = {}
            for secure in order:
                print(f"round {index + 1}/{rounds}: {'secure' if secure else 'insecure'} mesh", flush=True)
                workdir = Path(tmp) / f"round-{index}"
                workdir.mkdir(exist_ok=True)
                measured["secure" if secure else "insecure"] = await measure(secure, workdir, plan)
            results.append(measured)
    return {"rounds": rounds, "quick": plan.quick, "summary": summarize(results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Fewer requests per point.")
    parser.add_argument("--rounds", type=int, default=2, help="Rounds of both meshes (medians over rounds).")
    args = parser.parse_args()
    report = asyncio.run(run(Plan(args.quick), args.rounds))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "security_cost.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report["summary"], indent=2))


if __name__ == "__main__":
    main()
