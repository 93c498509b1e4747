"""The optimizer's wire translation (shared.optim.wire): one home, used by the scheduler and the shards."""

from __future__ import annotations

import pytest

from services.paramserver.core.config import ShardConfig, build_optimizer
from services.scheduler.core.jobs.model import OptimizerSpec
from shared.errors import InvalidArgument
from shared.optim import wire


def test_flat_doubles_become_make_optimizer_arguments() -> None:
    kwargs = wire.optimizer_arguments({"lr": 0.1, "beta2": 0.99, "amsgrad": 1.0})
    assert kwargs == {"lr": 0.1, "betas": (0.9, 0.99), "amsgrad": True}
    assert wire.schedule_config("step", {"step_size": 10.0, "gamma": 0.5}) == {
        "kind": "step",
        "step_size": 10,
        "gamma": 0.5,
    }
    assert wire.schedule_config("", {}) is None


def shard_config(**optimizer: object) -> ShardConfig:
    return ShardConfig(
        job_id="job-1", shard_index=0, num_shards=1, num_workers=1, consistency="bsp", architecture="mlp", **optimizer
    )  # type: ignore[arg-type]


def test_the_scheduler_and_a_shard_build_the_same_optimizer_and_name_their_own_fields() -> None:
    spec = OptimizerSpec(
        name="adam",
        hyperparameters={"lr": 0.01, "beta1": 0.8},
        schedule="cosine",
        schedule_arguments={"total_steps": 100.0},
    )
    shard = shard_config(
        optimizer="adam",
        hyperparameters=spec.hyperparameters,
        schedule="cosine",
        schedule_arguments=spec.schedule_arguments,
    )
    at_submit_time, on_shard = spec.make(), build_optimizer(shard)
    assert type(at_submit_time) is type(on_shard)
    public = {k: v for k, v in vars(on_shard).items() if not k.startswith("_") and k != "schedule"}
    assert public and public == {k: v for k, v in vars(at_submit_time).items() if k in public}
    assert [at_submit_time.lr_at(s) for s in (0, 50, 99)] == [on_shard.lr_at(s) for s in (0, 50, 99)]
    bad = {"nesterov": 2.0}
    with pytest.raises(InvalidArgument) as at_submit:
        OptimizerSpec(name="sgd", hyperparameters=bad).make()
    with pytest.raises(InvalidArgument) as at_shard:
        build_optimizer(shard_config(optimizer="sgd", hyperparameters=bad))
    assert at_submit.value.violations[0].field == "hyperparameters.nesterov"
    assert at_shard.value.violations[0].field == "config.optimizer.hyperparameters.nesterov"
