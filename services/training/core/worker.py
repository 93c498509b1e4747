"""One rank of a job from start to end: model, data shard, loop, and (rank 0) the held-out evaluation."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import torch
from torch import nn

from services.training.core.loop import Batches, LoopConfig, Progress, evaluate, final_parameters, run_loop
from services.training.core.ports import ShardClient
from shared.artifacts import Manifest, build_model
from shared.datasets import DatasetSpec, load
from shared.sharding import plan_for_state


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker needs to know about its job."""

    job_id: str
    rank: int
    world_size: int
    architecture: str
    arguments_json: str
    dataset: DatasetSpec
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    num_shards: int
    codec: str = "none"
    codec_options: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    max_piece_elements: int = 0
    data_root: str | None = None
    dataset_fingerprint: str | None = None


@dataclass
class WorkerResult:
    rank: int
    steps: int
    # Rank 0 only: the trained model, its manifest and its held-out metrics.
    model: nn.Module | None = None
    manifest: Manifest | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def _build(spec: WorkerSpec) -> tuple[Manifest, nn.Module]:
    manifest = Manifest.for_model(spec.architecture, json.loads(spec.arguments_json or "{}"))
    # The seeded model is only the architecture here: the values come from the shards at the first pull.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = build_model(manifest)
    # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it gave this actor: a worker that asked for none sees none.
    return manifest, model.to(training_device())


def training_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


async def run_worker(
    spec: WorkerSpec,
    shards: list[ShardClient],
    *,
    resume: bool = False,
    progress: Progress | None = None,
    stop: asyncio.Event | None = None,
) -> WorkerResult:
    """Train this rank to the job's last step; a resumed worker first asks the shards where to start."""
    manifest, model = await asyncio.to_thread(_build, spec)
    dataset = await asyncio.to_thread(
        load,
        spec.dataset,
        spec.architecture,
        manifest.arguments,
        data_root=spec.data_root,
        expected_fingerprint=spec.dataset_fingerprint,
    )
    x, y = dataset.shard(spec.rank, spec.world_size)
    batches = Batches(x, y, spec.batch_size, spec.steps_per_epoch, spec.seed, spec.rank)
    plan = plan_for_state(model.state_dict(), spec.num_shards, spec.max_piece_elements)
    start = 0
    if resume:
        starts = await asyncio.gather(*(shard.replace_worker(spec.job_id, spec.rank) for shard in shards))
        start = min(starts)
    config = LoopConfig(
        job_id=spec.job_id,
        rank=spec.rank,
        world_size=spec.world_size,
        batch_size=spec.batch_size,
        steps=spec.total_steps,
        codec=spec.codec,
        codec_options=dict(spec.codec_options),
        seed=spec.seed,
    )
    steps = await run_loop(config, model, plan, shards, batches, start_step=start, progress=progress, stop=stop)
    result = WorkerResult(rank=spec.rank, steps=steps)
    if spec.rank == 0 and steps >= spec.total_steps:
        await final_parameters(spec.job_id, plan, shards, model, spec.total_steps, spec.world_size)
        vx, vy = dataset.validation.tensors
        result.metrics = await asyncio.to_thread(evaluate, model, vx, vy)
        result.model, result.manifest = model, manifest
    return result
