"""Submit-time validation of training job specs: defaults, step counts, conversions, field names."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from services.scheduler.core.jobs.model import JobState, OptimizerSpec, ResourceRequest, TrainingJobSpec
from services.scheduler.core.jobs.validation import steps_per_epoch, validate_spec
from shared.compression import get_codec
from shared.datasets import DatasetSpec
from shared.errors import InvalidArgument


def spec(**fields: object) -> TrainingJobSpec:
    base = TrainingJobSpec(
        architecture="cnn",
        arguments_json="",
        dataset=DatasetSpec(name="digits"),
        batch_size=32,
        epochs=3,
        workers=4,
        shards=2,
        consistency="",
        codec="",
        target_model="digits-cnn",
    )
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


def check(value: TrainingJobSpec, tmp_path: Path):
    return validate_spec(value, data_root=tmp_path, default_max_failures=3)


@pytest.mark.parametrize(
    ("num_train", "workers", "batch_size", "expected"),
    [(1438, 1, 32, 44), (1438, 2, 32, 22), (1438, 4, 32, 11), (10, 3, 4, 1), (5, 5, 64, 1), (64, 1, 64, 1)],
)
def test_steps_per_epoch(num_train: int, workers: int, batch_size: int, expected: int) -> None:
    assert steps_per_epoch(num_train, workers, batch_size) == expected


def test_defaults_are_filled_in(tmp_path: Path) -> None:
    validated = check(spec(), tmp_path)
    normalised = validated.spec
    assert normalised.arguments_json == "{}" and normalised.consistency == "bsp" and normalised.codec == "none"
    assert normalised.optimizer.name == "sgd" and normalised.tenant == "default" and normalised.max_failures == 3
    assert normalised.dataset.validation_fraction == 0.2
    assert validated.dataset.num_train == 1438
    assert validated.steps_per_epoch == (1438 // 4) // 32 and validated.total_steps == 3 * validated.steps_per_epoch
    assert check(spec(max_failures=1), tmp_path).spec.max_failures == 1


def test_wire_doubles_convert_like_the_runner_must(tmp_path: Path) -> None:
    value = spec(
        codec="int8",
        codec_options={"bucket_size": 128.0},
        optimizer=OptimizerSpec(
            name="adam",
            hyperparameters={"lr": 0.01, "beta1": 0.8, "amsgrad": 1.0},
            schedule="cosine",
            schedule_arguments={"total_steps": 100.0},
        ),
        consistency="ssp",
        staleness=2,
    )
    check(value, tmp_path)
    assert value.codec_kwargs() == {"bucket_size": 128}
    get_codec(value.codec, **value.codec_kwargs())
    assert value.optimizer.kwargs() == {"lr": 0.01, "amsgrad": True, "betas": (0.8, 0.999)}
    assert value.optimizer.schedule_config() == {"kind": "cosine", "total_steps": 100}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"optimizer": OptimizerSpec(hyperparameters={"nesterov": 0.5})}, "spec.optimizer.hyperparameters.nesterov"),
        ({"optimizer": OptimizerSpec(hyperparameters={"warp": 1.0})}, "spec.optimizer.hyperparameters"),
        (
            {"optimizer": OptimizerSpec(name="adam", hyperparameters={"beta2": 1.0})},
            "spec.optimizer.hyperparameters.beta2",
        ),
        ({"optimizer": OptimizerSpec(schedule="cosine")}, "spec.optimizer.schedule_arguments.total_steps"),
        ({"optimizer": OptimizerSpec(schedule="zigzag")}, "spec.optimizer.schedule"),
        ({"optimizer": OptimizerSpec(schedule_arguments={"gamma": 0.5})}, "spec.optimizer.schedule_arguments"),
        ({"consistency": "bsp", "staleness": 2}, "spec.staleness"),
        ({"codec": "topk", "codec_options": {"ratio": math.nan}}, "spec.codec_options.ratio"),
        ({"codec": "fp16", "codec_options": {"ratio": 0.1}}, "spec.codec_options"),
        ({"dataset": DatasetSpec(name="digits", validation_fraction=1.5)}, "spec.dataset.validation_fraction"),
        ({"dataset": DatasetSpec(name="synthetic-sequences")}, "spec.dataset"),
        ({"arguments_json": "[1, 2]"}, "spec.arguments_json"),
        ({"priority": -1001}, "spec.priority"),
        ({"shard_resources": ResourceRequest(gpus=math.inf)}, "spec.shard_resources.gpus"),
    ],
)
def test_bad_fields_are_named(tmp_path: Path, fields: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        check(spec(**fields), tmp_path)
    assert info.value.violations[0].field.startswith(field), info.value.message
    assert info.value.message.startswith(info.value.violations[0].field)


def test_specs_round_trip_through_their_stored_form(tmp_path: Path) -> None:
    normalised = check(spec(codec="topk", codec_options={"ratio": 0.1}), tmp_path).spec
    assert TrainingJobSpec.from_dict(normalised.to_dict()) == normalised


def test_job_states() -> None:
    assert [s for s in JobState if s.terminal] == [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED]
    assert [s for s in JobState if s.active] == [JobState.PLACING, JobState.RUNNING, JobState.PREEMPTED]


@pytest.mark.parametrize(
    "arguments_json",
    ['{"in_features": ' + "9" * 5000 + "}", "[" * 100_000 + "]" * 100_000, "{not json"],
    ids=["beyond-the-digit-limit", "deeply-nested", "malformed"],
)
def test_hostile_arguments_json_is_invalid_argument(tmp_path: Path, arguments_json: str) -> None:
    with pytest.raises(InvalidArgument, match="arguments_json"):
        check(spec(arguments_json=arguments_json), tmp_path)
