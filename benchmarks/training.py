"""Data-parallel training throughput (1 vs 2 workers) and bytes per step per codec, through real shards.

Run ``python -m benchmarks.training``; ``--quick`` takes fewer steps. In one run it trains, each time with
fresh shard servers (``python -m services.paramserver``, one process each, on free loopback ports, waited
for with ``grpc.health.v1``) and the workers in this process, exactly as
``tests/integration/test_training_inprocess.py`` does (``services.training.core.worker.run_worker`` over
``GrpcShard(ParamServerClient)``; each worker has its own channels):

1. **throughput**: the digits CNN (zoo ``cnn``, defaults, on ``digits``) and a small transformer classifier
   (zoo ``transformer-classifier``: seq_len 32, width 64, depth 2, 4 heads, vocabulary 64, on
   ``synthetic-sequences`` with the same seq_len and vocabulary), each with 1 and with 2 workers, BSP,
   codec ``none``, batch 32 per worker; ``--warmup`` steps, then ``--steps`` timed steps;
2. **codecs**: the digits CNN with 2 workers and each codec (none, fp16, bf16, int8, topk at ratio 0.01):
   payload bytes each worker pushes per step (``StepReport.bytes_sent``) and pulls per step
   (``bytes_received``), and the throughput.

Samples/s counts every worker's samples over the timed steps: from the first moment any worker finished
its warm-up to the moment the last worker finished its last step (so a slow worker counts against it).
The held-out accuracy rank 0 reports at the end is a sanity check, not a target (few steps).
This process uses one torch thread (``torch.set_num_threads(1)``, as a worker does by default); both
workers compute in threads of it. Prints tables and writes ``benchmarks/results/training.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from benchmarks.paramserver import START_TIMEOUT_S, start_shards, wait_healthy

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "training.json"
QUICK_RESULTS = REPO / "benchmarks" / "results" / "training-quick.json"
BATCH = 32
SHARDS = 2
SEED = 7
RUN_TIMEOUT_S = 300.0
TRANSFORMER = {"vocab_size": 64, "seq_len": 32, "width": 64, "depth": 2, "heads": 4, "num_classes": 2}
CODECS: list[tuple[str, dict[str, float]]] = [
    ("none", {}),
    ("fp16", {}),
    ("bf16", {}),
    ("int8", {}),
    ("topk", {"ratio": 0.01}),
]


@dataclass(frozen=True)
class Model:
    name: str
    architecture: str
    arguments: dict[str, Any]
    dataset: str
    dataset_options: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "sgd"
    hyperparameters: dict[str, float] = field(default_factory=dict)


MODELS = {
    # The optimizer of tests/integration/test_training_inprocess.py.
    "cnn": Model("digits CNN", "cnn", {}, "digits", hyperparameters={"lr": 0.05, "momentum": 0.9}),
    "transformer": Model(
        "transformer classifier",
        "transformer-classifier",
        TRANSFORMER,
        "synthetic-sequences",
        {"seq_len": TRANSFORMER["seq_len"], "vocab_size": TRANSFORMER["vocab_size"], "num_classes": 2},
        optimizer="adam",
        hyperparameters={"lr": 0.001},
    ),
}


async def train(
    model: Model,
    workers: int,
    *,
    steps: int,
    warmup: int,
    shards: int,
    workdir: Path,
    codec: str = "none",
    codec_options: dict[str, float] | None = None,
) -> dict[str, Any]:
    """One job from fresh shards to the last step; returns its figures."""
    from maas.paramserver.v1 import paramserver_pb2 as pb

    from services.training.adapters.shards import GrpcShard
    from services.training.core.loop import StepReport
    from services.training.core.worker import WorkerSpec, run_worker
    from shared.artifacts import Manifest, build_model
    from shared.clients.paramserver import ParamServerClient
    from shared.datasets import DatasetSpec, validate
    from shared.settings import CommonSettings

    job_id = f"bench-{uuid.uuid4().hex[:8]}"
    dataset = DatasetSpec(name=model.dataset, options=dict(model.dataset_options))
    info = validate(dataset, model.architecture, model.arguments)
    per_epoch = (info.num_train // workers) // BATCH
    total_steps = warmup + steps
    parameters = sum(
        p.numel() for p in build_model(Manifest.for_model(model.architecture, model.arguments), "meta").parameters()
    )
    label = f"{model.name}, {workers} worker(s), {codec}"
    print(f"{label}: starting {shards} shards ...", flush=True)
    started = time.perf_counter()
    run_dir = workdir / job_id
    run_dir.mkdir()
    servers, targets = start_shards(shards, run_dir)
    clients: list[ParamServerClient] = []
    stamps: list[tuple[float, StepReport]] = []
    try:
        await asyncio.gather(*(wait_healthy(s, t, START_TIMEOUT_S) for s, t in zip(servers, targets, strict=True)))
        settings = CommonSettings()
        admin = [ParamServerClient.connect(t, settings) for t in targets]
        clients.extend(admin)
        await asyncio.gather(
            *(
                client.init_shard(
                    pb.ShardConfig(
                        job_id=job_id,
                        shard_index=index,
                        num_shards=shards,
                        num_workers=workers,
                        consistency="bsp",
                        model=pb.ModelSpec(
                            architecture=model.architecture, arguments_json=json.dumps(model.arguments), seed=SEED
                        ),
                        optimizer=pb.OptimizerSpec(name=model.optimizer, hyperparameters=model.hyperparameters),
                        checkpoint_interval=0,
                    )
                )
                for index, client in enumerate(admin)
            )
        )
        setup_s = time.perf_counter() - started
        specs = [
            WorkerSpec(
                job_id=job_id,
                rank=rank,
                world_size=workers,
                architecture=model.architecture,
                arguments_json=json.dumps(model.arguments),
                dataset=dataset,
                batch_size=BATCH,
                steps_per_epoch=per_epoch,
                total_steps=total_steps,
                num_shards=shards,
                codec=codec,
                codec_options=dict(codec_options or {}),
                seed=SEED,
            )
            for rank in range(workers)
        ]
        # Each worker its own channels, as separate worker processes would have.
        worker_shards = []
        for _ in range(workers):
            own = [ParamServerClient.connect(t, settings) for t in targets]
            clients.extend(own)
            worker_shards.append([GrpcShard(c) for c in own])

        def progress(report: StepReport) -> None:
            stamps.append((time.perf_counter(), report))

        results = await asyncio.wait_for(
            asyncio.gather(
                *(run_worker(spec, s, progress=progress) for spec, s in zip(specs, worker_shards, strict=True))
            ),
            RUN_TIMEOUT_S,
        )
        assert all(r.steps == total_steps for r in results), [r.steps for r in results]
        for server in servers:
            server.check_alive()
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
        for server in servers:
            server.stop()
    # The timed window: from the first end of a warm-up to the last end of a timed step.
    begin = min(t for t, r in stamps if r.step == warmup - 1) if warmup else started + setup_s
    end = max(t for t, r in stamps if r.step == total_steps - 1)
    timed = [r for _, r in stamps if r.step >= warmup]
    assert len(timed) == workers * steps, (len(timed), workers, steps)
    seconds = end - begin
    samples = workers * steps * BATCH
    last = sorted(timed, key=lambda r: r.step)[-10 * workers :]
    figures = {
        "model": model.name,
        "architecture": model.architecture,
        "arguments": model.arguments,
        "dataset": {"name": model.dataset, "options": model.dataset_options, "num_train": info.num_train},
        "optimizer": {"name": model.optimizer, **model.hyperparameters},
        "parameters": parameters,
        "workers": workers,
        "shards": shards,
        "codec": codec,
        "codec_options": codec_options or {},
        "batch_per_worker": BATCH,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "setup_seconds": round(setup_s, 2),
        "timed_seconds": round(seconds, 3),
        "samples_per_s": round(samples / seconds, 1),
        "steps_per_s": round(steps / seconds, 2),
        "mean_step_ms": round(1000 * sum(BATCH / r.samples_per_s for r in timed) / len(timed), 2),
        "bytes_sent_per_step": round(sum(r.bytes_sent for r in timed) / len(timed)),
        "bytes_received_per_step": round(sum(r.bytes_received for r in timed) / len(timed)),
        "final_loss": round(sum(r.loss for r in last) / len(last), 4),
        "accuracy": round(results[0].metrics.get("accuracy", float("nan")), 4),
    }
    print(
        f"  {figures['samples_per_s']:.0f} samples/s ({figures['steps_per_s']:.1f} steps/s, "
        f"{figures['mean_step_ms']:.1f} ms/step/worker), {figures['bytes_sent_per_step']} B pushed and "
        f"{figures['bytes_received_per_step']} B pulled per step per worker, loss {figures['final_loss']:.3f}, "
        f"accuracy {figures['accuracy']:.3f} (setup {setup_s:.1f}s)",
        flush=True,
    )
    return figures


async def benchmark(steps: int, warmup: int, shards: int, workdir: Path) -> dict[str, Any]:
    import torch

    load_start = os.getloadavg()
    throughput = []
    for key in ("cnn", "transformer"):
        for workers in (1, 2):
            throughput.append(
                await train(MODELS[key], workers, steps=steps, warmup=warmup, shards=shards, workdir=workdir)
            )
    codecs = []
    for codec, options in CODECS:
        if codec == "none":  # the 2-worker CNN run above
            codecs.append(next(r for r in throughput if r["architecture"] == "cnn" and r["workers"] == 2))
            continue
        codecs.append(
            await train(
                MODELS["cnn"],
                2,
                steps=steps,
                warmup=warmup,
                shards=shards,
                workdir=workdir,
                codec=codec,
                codec_options=options,
            )
        )
    dense = codecs[0]["bytes_sent_per_step"]
    for row in codecs:
        row["compression_vs_none"] = round(dense / row["bytes_sent_per_step"], 2)
    return {
        "benchmark": "training",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "grpcio": grpc.__version__,
            "torch_threads": torch.get_num_threads(),
            "network": "loopback (127.0.0.1), plaintext",
            # Other work on the machine skews every figure: the 1/5/15-minute load at the start and the end.
            "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
        },
        "consistency": "bsp",
        "shards": shards,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "throughput": throughput,
        "codecs": codecs,
    }


def print_tables(result: dict[str, Any]) -> None:
    print()
    print(
        f"training throughput: BSP, {result['shards']} shard processes, workers in one process "
        f"({result['machine']['torch_threads']} torch thread), batch {BATCH}/worker, {result['warmup_steps']} warm-up "
        f"+ {result['timed_steps']} timed steps, {result['machine']['cpus']} CPUs"
    )
    header = (
        f"{'model':<24} {'params':>8} {'workers':>7} {'samples/s':>10} {'speed-up':>8} {'ms/step':>8} "
        f"{'push B/step':>12} {'pull B/step':>12} {'loss':>6} {'accuracy':>8}"
    )
    print(header)
    print("-" * len(header))
    single: dict[str, float] = {}
    for row in result["throughput"]:
        if row["workers"] == 1:
            single[row["model"]] = row["samples_per_s"]
        speedup = row["samples_per_s"] / single[row["model"]] if row["model"] in single else float("nan")
        print(
            f"{row['model']:<24} {row['parameters']:>8} {row['workers']:>7} {row['samples_per_s']:>10.0f} "
            f"{speedup:>8.2f} {row['mean_step_ms']:>8.1f} {row['bytes_sent_per_step']:>12} "
            f"{row['bytes_received_per_step']:>12} {row['final_loss']:>6.3f} {row['accuracy']:>8.3f}"
        )
    print()
    print("bytes per step per worker by codec (digits CNN, 2 workers, BSP)")
    header = (
        f"{'codec':<16} {'push B/step':>12} {'vs none':>8} {'pull B/step':>12} {'samples/s':>10} "
        f"{'ms/step':>8} {'loss':>6} {'accuracy':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in result["codecs"]:
        name = row["codec"] + "".join(f" {k} {v:g}" for k, v in row["codec_options"].items())
        print(
            f"{name:<16} {row['bytes_sent_per_step']:>12} {row['compression_vs_none']:>7.1f}x "
            f"{row['bytes_received_per_step']:>12} {row['samples_per_s']:>10.0f} {row['mean_step_ms']:>8.1f} "
            f"{row['final_loss']:>6.3f} {row['accuracy']:>8.3f}"
        )
    print(
        f"load average (1 min) at start {result['machine']['load_average_start'][0]}, "
        f"at end {result['machine']['load_average_end'][0]} (other processes share the CPUs)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 timed steps after 5 warm-up steps")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per worker (default 100)")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up steps, not timed (default 10)")
    parser.add_argument("--shards", type=int, default=SHARDS, help=f"shard processes (default {SHARDS})")
    parser.add_argument("--output", type=Path, help=f"JSON results (default {RESULTS}; --quick: {QUICK_RESULTS})")
    args = parser.parse_args(argv)
    steps, warmup = (20, 5) if args.quick else (args.steps, args.warmup)
    if steps < 1 or warmup < 0 or args.shards < 1:
        parser.error("--steps and --shards must be positive, --warmup not negative")
    import torch

    torch.set_num_threads(1)
    output = args.output or (QUICK_RESULTS if args.quick else RESULTS)
    workdir = Path(tempfile.mkdtemp(prefix="maas-bench-training-"))
    started = time.perf_counter()
    try:
        result = asyncio.run(benchmark(steps, warmup, args.shards, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    print_tables(result)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output} ({result['wall_seconds']}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
