"""The parameter server through its public gRPC API: real shards on port 0, real clients, no Ray.

Workers here are asyncio tasks doing what real workers do: pull the pieces they lack from every
shard, join them into parameters, compute gradients of a tiny zoo MLP on their own batch, split them
with the job's plan, encode them and push them to the shards that hold each piece.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import torch.nn.functional as F
from maas.paramserver.v1 import paramserver_pb2 as pb

from services.paramserver.main import RunningShard, hosted, start
from services.paramserver.settings import ParamServerSettings
from shared.artifacts import Manifest, build_model
from shared.clients.paramserver import (
    MAX_BLOB_BYTES,
    ParamServerClient,
    PushResult,
    frame_tensor,
    plan_for_job,
)
from shared.compression import Encoded, get_codec, tensor_to_bytes
from shared.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from shared.sharding import ShardPlan

JOB = "job-1"
ARGS = {"in_features": 4, "hidden": [8], "out_features": 3}
SEED = 7

Launch = Callable[..., Awaitable[tuple[list[RunningShard], list[ParamServerClient]]]]


def config(
    index: int = 0,
    *,
    num_shards: int = 2,
    num_workers: int = 2,
    consistency: str = "bsp",
    staleness: int = 0,
    job_id: str = JOB,
    optimizer: str = "sgd",
    hparams: dict[str, float] | None = None,
    arguments: dict[str, Any] | None = None,
    interval: int = 0,
    max_piece: int = 16,
    **fields: Any,
) -> pb.ShardConfig:
    return pb.ShardConfig(
        job_id=job_id,
        shard_index=index,
        num_shards=num_shards,
        num_workers=num_workers,
        consistency=consistency,
        staleness=staleness,
        model=pb.ModelSpec(architecture="mlp", arguments_json=json.dumps(arguments or ARGS), seed=SEED),
        optimizer=pb.OptimizerSpec(name=optimizer, hyperparameters=hparams or {"lr": 0.1}),
        checkpoint_interval=interval,
        max_piece_elements=max_piece,
        **fields,
    )


def seeded_model(arguments: dict[str, Any] | None = None) -> torch.nn.Module:
    torch.manual_seed(SEED)
    return build_model(Manifest.for_model("mlp", arguments or ARGS))


def batch(worker: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + worker)
    return torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def gradients(model: torch.nn.Module, params: dict[str, torch.Tensor], worker: int) -> dict[str, torch.Tensor]:
    """The gradient of the worker's loss at ``params`` (the fake training step every test uses)."""
    model.load_state_dict(params)
    model.zero_grad()
    x, y = batch(worker)
    F.cross_entropy(model(x), y).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def reference_sgd(
    steps: int, workers: Iterable[int], lr: float = 0.1, momentum: float = 0.0
) -> dict[str, torch.Tensor]:
    """Synchronous data parallelism in one process: torch.optim.SGD on the averaged gradients."""
    model = seeded_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    workers = list(workers)
    for _ in range(steps):
        params = {k: v.clone() for k, v in model.state_dict().items()}
        grads = [gradients(seeded_model(), params, w) for w in workers]
        for name, p in model.named_parameters():
            p.grad = torch.stack([g[name] for g in grads]).mean(0)
        optimizer.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


class Worker:
    """A training worker talking to every shard of the job."""

    def __init__(
        self, index: int, clients: list[ParamServerClient], plan: ShardPlan, codec: str = "none", **options: Any
    ) -> None:
        self.index, self.clients, self.plan = index, clients, plan
        self.model = seeded_model()
        self.versions: list[dict[str, int]] = [{} for _ in clients]
        self.incarnations = [""] * len(clients)
        self.cache: dict[str, torch.Tensor] = {}
        self.encoder = get_codec(codec, **options).encoder(generator=torch.Generator().manual_seed(index))
        self.pulled: list[int] = []
        self.pushed: list[PushResult] = []

    async def pull(self, step: int, wait: float = 0) -> list[int]:
        """Pulls from every shard; returns how many pieces each sent."""
        results = await asyncio.gather(
            *(
                client.pull(JOB, self.index, step, self.versions[i], self.incarnations[i], wait)
                for i, client in enumerate(self.clients)
            )
        )
        for i, result in enumerate(results):
            self.incarnations[i] = result.incarnation
            for key, (version, tensor) in result.tensors.items():
                self.versions[i][key] = version
                self.cache[key] = tensor
            self.pulled.append(result.bytes_received)
        return [len(r.tensors) for r in results]

    def params(self) -> dict[str, torch.Tensor]:
        return self.plan.join(self.cache)

    async def push(self, step: int, grads: dict[str, torch.Tensor]) -> list[PushResult]:
        per_shard: list[dict[str, Encoded]] = [{} for _ in self.clients]
        for name, grad in grads.items():
            for key, piece in self.plan.split(name, grad).items():
                per_shard[self.plan.piece(key).shard][key] = self.encoder.encode(key, piece)
        results = await asyncio.gather(
            *(client.push(JOB, self.index, step, per_shard[i]) for i, client in enumerate(self.clients))
        )
        self.pushed.extend(results)
        return list(results)

    async def step(self, step: int) -> None:
        await self.pull(step)
        await self.push(step, gradients(self.model, self.params(), self.index))

    async def train(self, steps: int, start: int = 0) -> None:
        for step in range(start, start + steps):
            await self.step(step)


@pytest.fixture
def ps_settings(tmp_path: Path) -> ParamServerSettings:
    return ParamServerSettings(home=tmp_path / "home", shutdown_grace_s=0.2, paramserver_pull_timeout_s=20)


@pytest.fixture
async def launch(ps_settings: ParamServerSettings) -> AsyncIterator[Launch]:
    """Starts shard servers (and a client of each); everything started is stopped at the end."""
    started: list[tuple[RunningShard, ParamServerClient]] = []

    async def _launch(n: int = 2, *configs: pb.ShardConfig) -> tuple[list[RunningShard], list[ParamServerClient]]:
        shards = [await start(ps_settings) for _ in range(n)]
        clients = [ParamServerClient.connect(f"127.0.0.1:{s.port}", ps_settings) for s in shards]
        started.extend(zip(shards, clients, strict=True))
        for client, cfg in zip(clients, configs, strict=False):
            await client.init_shard(cfg)
        return shards, clients

    yield _launch
    await stop([s for s, _ in started], [c for _, c in started])


async def stop(shards: Iterable[RunningShard], clients: Iterable[ParamServerClient]) -> None:
    # Stopping twice is harmless (the recovery test stops its first shards itself).
    await asyncio.gather(*(c.close() for c in clients))
    await asyncio.gather(*(s.stop(0) for s in shards))


# ---------------------------------------------------------------------------------------------- init


async def test_init_fresh_idempotent_and_other_jobs_refused(launch: Launch) -> None:
    _, (client, _) = await launch(2)
    first = await client.init_shard(config(0))
    assert not first.restored and first.step == 0 and first.incarnation
    plan = plan_for_job(config(0))
    assert first.plan_fingerprint == plan.fingerprint()
    assert list(first.keys) == [p.key for p in plan.for_shard(0)]
    again = await client.init_shard(config(0))
    assert (again.incarnation, list(again.keys), again.step) == (first.incarnation, list(first.keys), 0)
    with pytest.raises(FailedPrecondition, match="already holds job 'job-1'"):
        await client.init_shard(config(0, job_id="job-2"))
    with pytest.raises(FailedPrecondition, match="differs in num_workers"):
        await client.init_shard(config(0, num_workers=3))
    status = await client.status(JOB)
    assert (status.job_id, status.shard_index, status.step) == (JOB, 0, 0)
    assert status.parameters == sum(p.numel for p in plan.for_shard(0))
    assert dict(status.worker_clocks) == {0: 0, 1: 0}


async def test_first_pull_returns_the_seeded_model(launch: Launch) -> None:
    _, clients = await launch(2, config(0), config(1))
    worker = Worker(0, clients, plan_for_job(config(0)))
    assert sum(await worker.pull(0)) == len(worker.plan.pieces)
    expected = seeded_model().state_dict()
    assert set(worker.params()) == set(expected)
    assert all(torch.equal(worker.params()[k], v) for k, v in expected.items())
    assert sum(worker.pulled) == 4 * sum(p.numel for p in worker.plan.pieces)
    # Up to date: nothing new, no bytes.
    assert await worker.pull(0) == [0, 0]
    assert worker.pulled[-2:] == [0, 0]


# ----------------------------------------------------------------------------------- consistency


async def test_bsp_two_workers_match_torch_sgd_on_averaged_gradients(launch: Launch) -> None:
    hparams = {"lr": 0.1, "momentum": 0.9}
    _, clients = await launch(2, config(0, hparams=hparams), config(1, hparams=hparams))
    plan = plan_for_job(config(0))
    workers = [Worker(w, clients, plan) for w in range(2)]
    steps = 4
    await asyncio.gather(*(w.train(steps) for w in workers))
    for w in workers:
        await w.pull(steps)
    expected = reference_sgd(steps, range(2), lr=0.1, momentum=0.9)
    for w in workers:
        got = w.params()
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, atol=1e-5, rtol=0)
    for client in clients:
        status = await client.status(JOB)
        assert status.step == steps and dict(status.worker_clocks) == {0: steps, 1: steps}
    # Every piece changed once per step: versions count the steps.
    assert set(workers[0].versions[0].values()) == {steps}
    # A retried push of a step already applied is a duplicate, not applied twice.
    grads = gradients(workers[0].model, workers[0].params(), 0)
    results = await workers[0].push(steps - 1, grads)
    assert all(r.duplicate for r in results)
    assert await workers[0].pull(steps) == [0, 0]


async def test_asp_applies_each_push_on_arrival(launch: Launch) -> None:
    _, clients = await launch(2, config(0, consistency="asp"), config(1, consistency="asp"))
    plan = plan_for_job(config(0))
    workers = [Worker(w, clients, plan) for w in range(2)]
    # Interleaved deterministically: each push is applied at once, scaled by 1 / workers.
    model = seeded_model()
    for step in range(2):
        for w in workers:
            await w.step(step)
            grads = gradients(seeded_model(), {k: v.clone() for k, v in model.state_dict().items()}, w.index)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p -= 0.1 * (grads[name] * 0.5)
    await workers[0].pull(2)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(workers[0].params()[name], value, atol=1e-5, rtol=0)
    # Nobody waits in ASP: one worker runs ahead as far as it likes.
    await workers[0].train(3, start=2)
    status = await clients[0].status(JOB)
    assert dict(status.worker_clocks) == {0: 5, 1: 2} and status.step == 2


async def test_ssp_holds_back_a_worker_more_than_s_steps_ahead(launch: Launch) -> None:
    ssp = {"num_shards": 1, "consistency": "ssp", "staleness": 1}
    _, clients = await launch(1, config(0, **ssp))
    plan = plan_for_job(config(0, **ssp))
    fast, slow = Worker(0, clients, plan), Worker(1, clients, plan)
    await fast.train(2)  # steps 0 and 1: step 1 is within 1 of the slow worker's clock 0
    with pytest.raises(DeadlineExceeded, match=r"workers \[1\]"):
        await fast.pull(2, wait=0.2)
    waiting = asyncio.create_task(fast.pull(2))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await slow.step(0)
    await asyncio.wait_for(waiting, 5)
    status = await clients[0].status(JOB)
    assert dict(status.worker_clocks) == {0: 2, 1: 1}


# ------------------------------------------------------------------------------------ compression


async def test_compressed_pushes_are_accepted_and_smaller(launch: Launch) -> None:
    arguments = {"in_features": 64, "hidden": [64], "out_features": 10}
    cfg = config(0, num_shards=1, num_workers=1, consistency="asp", arguments=arguments, max_piece=0)
    _, clients = await launch(1, cfg)
    plan = plan_for_job(cfg)
    # max_piece_elements 0 means the same default on both sides.
    assert (await clients[0].init_shard(cfg)).plan_fingerprint == plan.fingerprint()
    dense = 4 * sum(p.numel for p in plan.pieces)
    grads = {name: torch.randn(shape) for name, shape in plan.shapes.items()}
    sizes: dict[str, int] = {}
    codecs = [("none", {}), ("fp16", {}), ("bf16", {}), ("int8", {}), ("topk", {"ratio": 0.01})]
    for step, (codec, options) in enumerate(codecs):
        worker = Worker(0, clients, plan, codec, **options)
        await worker.pull(step)
        before = worker.params()
        (result,) = await worker.push(step, grads)
        assert not result.duplicate and result.bytes_received == result.bytes_sent
        sizes[codec] = result.bytes_received
        await worker.pull(step + 1)
        if codec == "none":  # one worker, ASP, SGD: exactly p - lr * g
            for name, value in before.items():
                torch.testing.assert_close(worker.params()[name], value - 0.1 * grads[name], atol=1e-6, rtol=0)
    print(f"push payload bytes per step ({dense // 4} parameters): {sizes}")
    assert sizes["none"] == dense
    assert sizes["fp16"] == sizes["bf16"] == dense // 2
    assert sizes["int8"] < dense / 3
    assert sizes["topk"] < dense / 10
    assert (await clients[0].status(JOB)).bytes_received == sum(sizes.values())


# ------------------------------------------------------------------------------------- checkpoints


async def test_checkpoint_and_recovery_on_a_new_server(launch: Launch, ps_settings: ParamServerSettings) -> None:
    hparams = {"lr": 0.1, "momentum": 0.9}
    cfgs = [config(i, num_workers=1, hparams=hparams, interval=2) for i in range(2)]
    shards, clients = await launch(2, *cfgs)
    plan = plan_for_job(cfgs[0])
    worker = Worker(0, clients, plan)
    await worker.train(3)
    statuses = [await c.status(JOB) for c in clients]
    assert [s.last_checkpoint_step for s in statuses] == [2, 2]  # periodic, every 2 steps
    saved = [await c.checkpoint(JOB) for c in clients]
    root = ps_settings.checkpoint_root().resolve()
    # Paths relative to the checkpoint root: no server path in an answer.
    assert [(s.step, s.path) for s in saved] == [(3, f"{JOB}/shard-{i}.safetensors") for i in range(2)]
    assert all((root / s.path).is_file() for s in saved)
    await worker.pull(3)
    before = worker.params()
    old_incarnations = list(worker.incarnations)
    await stop(shards, clients)

    # A new shard process over the same checkpoint root picks the job up where it was.
    _, clients = await launch(2)
    with pytest.raises(FailedPrecondition, match="was written for bsp with 1 workers"):
        await clients[0].init_shard(config(0, num_workers=2, hparams=hparams, interval=2))
    with pytest.raises(FailedPrecondition, match="holds sgd state, the config asks for adam"):
        await clients[0].init_shard(config(0, num_workers=1, optimizer="adam", interval=2))
    inits = [await c.init_shard(cfg) for c, cfg in zip(clients, cfgs, strict=True)]
    assert all(i.restored and i.step == 3 for i in inits)
    assert [i.incarnation for i in inits] != old_incarnations
    assert {i.plan_fingerprint for i in inits} == {plan.fingerprint()}
    worker.clients = clients
    # Versions from the old incarnation do not count: everything comes again.
    assert await worker.pull(3) == [len(plan.for_shard(0)), len(plan.for_shard(1))]
    assert all(torch.equal(worker.params()[k], v) for k, v in before.items())
    # Optimizer state (the momentum buffers) came back too: training goes on as if never stopped.
    await worker.train(1, start=3)
    await worker.pull(4)
    for name, value in reference_sgd(4, [0], lr=0.1, momentum=0.9).items():
        torch.testing.assert_close(worker.params()[name], value, atol=1e-5, rtol=0)


async def test_replace_worker_resumes_at_the_collected_step(launch: Launch) -> None:
    _, clients = await launch(1, config(0, num_shards=1))
    plan = plan_for_job(config(0, num_shards=1))
    workers = [Worker(w, clients, plan) for w in range(2)]
    await asyncio.gather(*(w.train(2) for w in workers))
    assert await clients[0].replace_worker(JOB, 1) == 2


# -------------------------------------------------------------------------------------- bad input


BAD_CONFIGS: list[tuple[dict[str, Any], str]] = [
    ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'"),
    ({"hparams": {"lr": -0.1}}, "lr: must be a finite number"),
    ({"hparams": {"lr": 0.1, "nesterov": 0.5}}, "nesterov"),
    ({"hparams": {"lr": 0.1, "rho": 0.5}}, "unknown sgd hyperparameters ['rho']"),
    ({"consistency": "eventual"}, "unknown consistency 'eventual'"),
    ({"staleness": 2}, "staleness: only applies to ssp"),
    ({"staleness": -1, "consistency": "ssp"}, "staleness: must be an integer >= 0"),
    ({"job_id": "../etc"}, "config.job_id"),
    ({"job_id": ""}, "config.job_id: must not be empty"),
    ({"index": 2}, "shard_index: must be in [0, 2)"),
    ({"num_workers": 0}, "num_workers: must be an integer >= 1"),
    ({"num_shards": 0, "index": 0}, "num_shards"),
    ({"interval": -1}, "checkpoint_interval"),
    ({"max_piece": -5}, "max_piece_elements"),
    ({"checkpoint_dir": "../outside"}, "checkpoint_dir"),
    ({"checkpoint_dir": "/abs/../etc"}, "checkpoint_dir"),
    ({"arguments": {"in_features": 0}}, "config.model"),
]


async def test_bad_configs_are_invalid_arguments(launch: Launch) -> None:
    _, (client,) = await launch(1)
    for fields, match in BAD_CONFIGS:
        fields = dict(fields)
        index = fields.pop("index", 0)
        with pytest.raises(InvalidArgument, match=re.escape(match)) as refused:
            await client.init_shard(config(index, **fields))
        assert "/tmp" not in refused.value.message  # no server path in an answer
    # Nothing was taken: a good config still works.
    assert not (await client.init_shard(config(0))).restored


async def test_bad_model_specs_and_schedules(launch: Launch) -> None:
    _, (client,) = await launch(1)
    bad_json = config(0)
    bad_json.model.arguments_json = "{not json"
    bad_arch = config(0)
    bad_arch.model.architecture = "resnet-9000"
    no_arch = config(0)
    no_arch.model.architecture = ""
    bad_schedule = config(0)
    bad_schedule.optimizer.schedule = "cosine"  # without total_steps
    fractional = config(0)
    fractional.optimizer.schedule = "step"
    fractional.optimizer.schedule_arguments["step_size"] = 2.5
    cases = [
        (bad_json, "arguments_json: is not valid JSON"),
        (bad_arch, "resnet-9000"),
        (no_arch, "config.model.architecture"),
        (bad_schedule, "total_steps"),
        (fractional, "step_size"),
        (pb.ShardConfig(), "config.job_id"),
    ]
    for cfg, match in cases:
        with pytest.raises(InvalidArgument, match=re.escape(match)):
            await client.init_shard(cfg)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.stub.InitShard(pb.InitShardRequest())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details() == "config: required"


async def test_calls_for_a_job_the_shard_does_not_hold(launch: Launch) -> None:
    _, (client,) = await launch(1, config(0, num_shards=1))
    message = "shard not initialised for job 'other'"
    calls = [
        client.push("other", 0, 0, {}),
        client.pull("other", 0, 0, {}, ""),
        client.status("other"),
        client.checkpoint("other"),
        client.replace_worker("other", 0),
    ]
    for call in calls:
        with pytest.raises(FailedPrecondition, match=message):
            await call
    _, (fresh,) = await launch(1)
    with pytest.raises(FailedPrecondition, match="shard not initialised for job 'job-1'"):
        await fresh.status(JOB)


async def test_hosted_entry_point_for_the_scheduler(tmp_path: Path) -> None:
    running = await hosted({"home": str(tmp_path / "home"), "shutdown_grace_s": 0.1, "unrelated": 1})
    try:
        client = ParamServerClient.connect(f"127.0.0.1:{running.port}", ParamServerSettings())
        reply = await client.init_shard(config(0, num_shards=1))
        assert reply.keys and running.host.job_id == JOB
        await client.close()
    finally:
        await running.stop()


def _piece(plan: ShardPlan, shard: int = 0) -> tuple[str, int]:
    piece = plan.for_shard(shard)[0]
    return piece.key, piece.numel


def _request(message: pb.TensorHeader | pb.Blob | pb.PushHeader) -> pb.PushRequest:
    if isinstance(message, pb.PushHeader):
        return pb.PushRequest(header=message)
    if isinstance(message, pb.TensorHeader):
        return pb.PushRequest(tensor=message)
    return pb.PushRequest(blob=message)


async def _raw_push(client: ParamServerClient, messages: list[Any]) -> pb.PushResponse:
    async def stream() -> AsyncIterator[pb.PushRequest]:
        for message in messages:
            yield _request(message)

    return await client.stub.Push(stream())


async def test_malformed_pushes_are_refused_and_change_nothing(launch: Launch) -> None:
    cfg = config(0, num_shards=1, num_workers=1)
    _, (client,) = await launch(1, cfg)
    plan = plan_for_job(cfg)
    key, numel = _piece(plan)
    header = pb.PushHeader(job_id=JOB, worker=0, step=0)
    dense = get_codec("none").encoder()
    good = dense.encode(key, torch.ones(numel))
    data = good.payload["data"]
    first = await client.pull(JOB, 0, 0, {}, "")
    versions = {k: v for k, (v, _) in first.tensors.items()}

    def tensor(**fields: Any) -> pb.TensorHeader:
        base: dict[str, Any] = {"key": key, "codec": "none", "shape": [numel], "part_bytes": {"data": len(data)}}
        return pb.TensorHeader(**{**base, **fields})

    def blob(offset: int = 0, payload: bytes = data, part: str = "data", name: str = key) -> pb.Blob:
        return pb.Blob(key=name, part=part, offset=offset, data=payload)

    nan = tensor_to_bytes(torch.full((numel,), math.nan))
    cases: list[tuple[list[Any], grpc.StatusCode, str]] = [
        ([tensor(), blob()], grpc.StatusCode.INVALID_ARGUMENT, "first message of a push must carry the PushHeader"),
        ([header, header], grpc.StatusCode.INVALID_ARGUMENT, "only the first message"),
        ([header, tensor(key="nope#0")], grpc.StatusCode.INVALID_ARGUMENT, "nope#0: is not a piece of this shard"),
        (
            [header, tensor(shape=[numel - 1], part_bytes={"data": len(data) - 4}), blob(payload=data[:-4])],
            grpc.StatusCode.INVALID_ARGUMENT,
            f"shape ({numel - 1},), expected ({numel},)",
        ),
        ([header, tensor(), blob(payload=nan)], grpc.StatusCode.INVALID_ARGUMENT, "non-finite"),
        ([header, tensor(), blob(offset=8, payload=data[8:])], grpc.StatusCode.INVALID_ARGUMENT, "expected 0"),
        (
            [header, tensor(), blob(payload=data[:8])],
            grpc.StatusCode.INVALID_ARGUMENT,
            f"8 of {len(data)} declared bytes arrived",
        ),
        (
            [header, tensor(), blob(payload=data + b"\0\0\0\0")],
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{len(data) + 4} bytes sent, {len(data)} declared",
        ),
        (
            [header, tensor(), blob(payload=b"\0" * (MAX_BLOB_BYTES + 1))],
            grpc.StatusCode.INVALID_ARGUMENT,
            f"blobs are at most {MAX_BLOB_BYTES} bytes",
        ),
        (
            [header, tensor(part_bytes={"data": 10**9})],
            grpc.StatusCode.INVALID_ARGUMENT,
            "more than any encoding of it needs",
        ),
        ([header, tensor(codec="zstd"), blob()], grpc.StatusCode.INVALID_ARGUMENT, "unknown codec 'zstd'"),
        ([header, blob()], grpc.StatusCode.INVALID_ARGUMENT, "has no TensorHeader before its blobs"),
        ([header, tensor(), blob(), tensor()], grpc.StatusCode.INVALID_ARGUMENT, "sent twice"),
        ([header, tensor(), blob(part="extra")], grpc.StatusCode.INVALID_ARGUMENT, "unknown payload part 'extra'"),
        (
            [header, tensor(part_bytes={"data": len(data), "extra": 0}), blob()],
            grpc.StatusCode.INVALID_ARGUMENT,
            "payload keys ['data']",
        ),
        (
            [pb.PushHeader(job_id=JOB, worker=5, step=0), *frame_tensor(key, good)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "worker: must be in [0, 1)",
        ),
        (
            [pb.PushHeader(job_id=JOB, worker=0, step=3), *frame_tensor(key, good)],
            grpc.StatusCode.FAILED_PRECONDITION,
            "pushed step 3 while step 0 is being collected",
        ),
        ([pb.PushHeader(job_id="other"), *frame_tensor(key, good)], grpc.StatusCode.FAILED_PRECONDITION, "other"),
    ]
    for messages, code, match in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _raw_push(client, messages)
        assert info.value.code() == code, (match, info.value.details())
        assert match in (info.value.details() or ""), (match, info.value.details())
    # Nothing was applied: versions unchanged, step 0 still open.
    again = await client.pull(JOB, 0, 0, versions, first.incarnation)
    assert again.tensors == {} and again.step == 0
    # The well-formed one goes through.
    reply = await _raw_push(client, [header, *frame_tensor(key, good)])
    assert reply.bytes_received == 4 * numel and not reply.duplicate


async def test_bad_pulls(launch: Launch) -> None:
    cfg = config(0, num_shards=1, num_workers=1)
    _, (client,) = await launch(1, cfg)
    with pytest.raises(InvalidArgument, match="keys not on shard 0"):
        await client.pull(JOB, 0, 0, {"nope#0": 1}, "")
    with pytest.raises(InvalidArgument, match="wait_timeout_s"):
        await client.pull(JOB, 0, 0, {}, "", wait_timeout_s=-1)
    with pytest.raises(InvalidArgument, match=r"worker: must be in \[0, 1\)"):
        await client.pull(JOB, 3, 0, {}, "")
    with pytest.raises(FailedPrecondition, match="asks to read for step 5"):
        await client.pull(JOB, 0, 5, {}, "")


async def test_large_pieces_travel_in_several_blobs(launch: Launch) -> None:
    # 1.2M-element first layer: one piece over 4 MiB of float32, so pushes and pulls need several blobs.
    arguments = {"in_features": 1200, "hidden": [1000], "out_features": 2}
    cfg = config(0, num_shards=1, num_workers=1, consistency="asp", arguments=arguments, max_piece=2_000_000)
    _, (client,) = await launch(1, cfg)
    plan = plan_for_job(cfg)
    key = "layers.0.weight#0"
    assert plan.piece(key).numel * 4 > MAX_BLOB_BYTES
    first = await client.pull(JOB, 0, 0, {}, "")
    blobs = [m for m in frame_tensor(key, get_codec("none").encoder().encode(key, first.tensors[key][1]))]
    assert len(blobs) == 3  # header + two blobs
    grad = torch.full((plan.piece(key).numel,), 0.5)
    result = await client.push(JOB, 0, 0, {key: get_codec("none").encoder().encode(key, grad)})
    assert result.bytes_received == 4 * grad.numel()
    after = await client.pull(JOB, 0, 1, {k: v for k, (v, _) in first.tensors.items()}, first.incarnation)
    assert list(after.tensors) == [key]
    torch.testing.assert_close(after.tensors[key][1], first.tensors[key][1] - 0.05)
