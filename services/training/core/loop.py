"""One rank of a data-parallel training job: pull, forward, backward, encode, push.

Parameters live on the shards (each holds some pieces of the flattened tensors, by the shared plan);
the worker keeps the last values it pulled with their versions, so a pull moves only what changed.
Compute runs in a worker thread, never on the event loop that talks to the shards.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from services.training.core.ports import ShardClient
from shared.compression import get_codec
from shared.sharding import ShardPlan


@dataclass(frozen=True)
class LoopConfig:
    job_id: str
    rank: int
    world_size: int
    batch_size: int
    steps: int
    codec: str = "none"
    codec_options: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    pull_timeout_s: float = 300.0


@dataclass(frozen=True)
class StepReport:
    rank: int
    step: int
    loss: float
    samples_per_s: float
    bytes_sent: int
    bytes_received: int


Progress = Callable[[StepReport], None]


class ShardedParameters:
    """The worker's copy of the parameters, kept in the plan's pieces with their versions per shard."""

    def __init__(self, plan: ShardPlan, shards: list[ShardClient]) -> None:
        self.plan = plan
        self.shards = shards
        self.values: dict[str, torch.Tensor] = {}
        self.versions: list[dict[str, int]] = [{} for _ in shards]
        self.incarnations = [""] * len(shards)

    async def pull(self, job_id: str, rank: int, step: int, timeout_s: float) -> int:
        """Refresh from every shard (concurrently); returns the bytes received."""
        results = await asyncio.gather(
            *(
                shard.pull(job_id, rank, step, self.versions[i], self.incarnations[i], timeout_s)
                for i, shard in enumerate(self.shards)
            )
        )
        received = 0
        for i, result in enumerate(results):
            if result.incarnation != self.incarnations[i]:
                # A restored shard: versions restarted, so everything it holds came back.
                self.versions[i] = {}
                self.incarnations[i] = result.incarnation
            for key, (version, tensor) in result.tensors.items():
                self.values[key] = tensor
                self.versions[i][key] = version
            received += result.bytes_received
        return received

    def load_into(self, model: nn.Module) -> None:
        joined = self.plan.join(self.values)
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(joined[name].view_as(param))


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def compute_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of a cross-entropy objective (classifiers and next-token models alike), on the
    model's device (a GPU when the worker has one); the codecs move only what they send to the host."""
    device = model_device(model)
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(x)
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    grads = {
        name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1)
        for name, p in model.named_parameters()
    }
    return float(loss.detach()), grads


class Batches:
    """Deterministic minibatches of this rank's data shard.

    Every rank must take the same number of steps (BSP waits for all of them), and strided shards differ in
    size by one, so steps per epoch come from the job (``(num_train // workers) // batch_size``), not from
    the shard's own length.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, per_epoch: int, seed: int, rank: int) -> None:
        self.x, self.y = x, y
        self.batch_size = min(batch_size, len(x))
        self.per_epoch = max(1, per_epoch)
        self.seed, self.rank = seed, rank

    def at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = divmod(step, self.per_epoch)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 7919 + epoch)
        order = torch.randperm(len(self.x), generator=generator)
        chosen = order[index * self.batch_size : (index + 1) * self.batch_size]
        return self.x[chosen], self.y[chosen]


async def run_loop(
    config: LoopConfig,
    model: nn.Module,
    plan: ShardPlan,
    shards: list[ShardClient],
    batches: Batches,
    *,
    start_step: int = 0,
    progress: Progress | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Train from ``start_step`` to ``config.steps``; returns the last step completed (+1)."""
    params = ShardedParameters(plan, shards)
    encoder = get_codec(config.codec, **config.codec_options).encoder(
        generator=torch.Generator().manual_seed(config.seed + config.rank)
    )
    shard_of = {piece.key: piece.shard for piece in plan.pieces}
    step = start_step
    while step < config.steps and not (stop and stop.is_set()):
        started = time.perf_counter()
        received = await params.pull(config.job_id, config.rank, step, config.pull_timeout_s)
        await asyncio.to_thread(params.load_into, model)
        x, y = batches.at(step)
        loss, grads = await asyncio.to_thread(compute_gradients, model, x, y)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {step}; lower the learning rate")
        per_shard: list[dict] = [{} for _ in shards]
        for name, grad in grads.items():
            for key, piece in plan.split(name, grad).items():
                per_shard[shard_of[key]][key] = encoder.encode(key, piece)
        pushed = await asyncio.gather(
            *(shard.push(config.job_id, config.rank, step, per_shard[i]) for i, shard in enumerate(shards))
        )
        elapsed = time.perf_counter() - started
        if progress is not None:
            progress(
                StepReport(
                    rank=config.rank,
                    step=step,
                    loss=loss,
                    samples_per_s=len(x) / elapsed if elapsed > 0 else 0.0,
                    bytes_sent=sum(p.bytes_sent for p in pushed),
                    bytes_received=received,
                )
            )
        step += 1
    return step


async def final_parameters(
    job_id: str, plan: ShardPlan, shards: list[ShardClient], model: nn.Module, steps: int, world_size: int
) -> None:
    """Wait until every worker finished ``steps`` on every shard, then load the final values into ``model``."""
    while True:
        clocks = await asyncio.gather(*(shard.worker_clocks(job_id) for shard in shards))
        if all(len(c) >= world_size and min(c.values()) >= steps for c in clocks):
            break
        await asyncio.sleep(0.05)
    params = ShardedParameters(plan, shards)
    # A read for `steps` by rank 0 passes every gate now that all clocks reached it.
    await params.pull(job_id, 0, steps, 60.0)
    params.load_into(model)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> dict[str, float]:
    """Held-out accuracy and mean loss."""
    model.eval()
    device = model_device(model)
    correct, total, loss_sum = 0, 0, 0.0
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            logits = model(x[i : i + batch_size].to(device))
            target = y[i : i + batch_size].to(device)
            flat = logits.reshape(-1, logits.shape[-1])
            loss_sum += float(nn.functional.cross_entropy(flat, target.reshape(-1), reduction="sum"))
            correct += int((flat.argmax(-1) == target.reshape(-1)).sum())
            total += target.numel()
    return {"accuracy": correct / max(total, 1), "loss": loss_sum / max(total, 1)}
