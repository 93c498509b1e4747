"""Deployment spec validation, the autoscaling policy (fake clock) and the canary split: pure, no I/O."""

from __future__ import annotations

import pytest

from services.scheduler.core.deployments.autoscaler import Autoscaler, split_replicas
from services.scheduler.core.deployments.model import (
    Autoscaling,
    Batching,
    Canary,
    DeploymentSpec,
    validate_deployment_spec,
)
from services.scheduler.core.deployments.reconciler import parse_replica_id, replica_id
from services.scheduler.core.jobs.model import ResourceRequest
from shared.errors import InvalidArgument

AUTO = Autoscaling(target_ongoing_requests=2, upscale_delay_s=2, downscale_delay_s=30)


def fields(spec: DeploymentSpec) -> list[str]:
    with pytest.raises(InvalidArgument) as info:
        validate_deployment_spec(spec, 1.0)
    return [v.field for v in info.value.violations]


def test_defaults_filled_in() -> None:
    spec = validate_deployment_spec(DeploymentSpec(model="mlp"), 0.5)
    assert spec.name == "mlp"
    assert spec.resources.cpus == 0.5
    assert spec.replica_bounds == (0, 1)
    assert spec.canary is None


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (DeploymentSpec(model="Bad Name"), "spec.model"),
        (DeploymentSpec(model="m", name="-x"), "spec.name"),
        (DeploymentSpec(model="m", version="0"), "spec.version"),
        (DeploymentSpec(model="m", version="Not/alias"), "spec.version"),
        (DeploymentSpec(model="m", min_replicas=3, max_replicas=2), "spec.max_replicas"),
        (DeploymentSpec(model="m", min_replicas=-1), "spec.min_replicas"),
        (DeploymentSpec(model="m", min_replicas=0, max_replicas=3), "spec.min_replicas"),
        (DeploymentSpec(model="m", batching=Batching(max_batch_size=1025)), "spec.batching.max_batch_size"),
        (
            DeploymentSpec(model="m", batching=Batching(max_queue_delay_us=2_000_000)),
            "spec.batching.max_queue_delay_us",
        ),
        (DeploymentSpec(model="m", batching=Batching(max_queue_size=-1)), "spec.batching.max_queue_size"),
        (
            DeploymentSpec(model="m", batching=Batching(max_batch_size=8, preferred_batch_sizes=(16,))),
            "spec.batching.preferred_batch_sizes",
        ),
        (DeploymentSpec(model="m", resources=ResourceRequest(cpus=-1)), "spec.resources.cpus"),
        (DeploymentSpec(model="m", resources=ResourceRequest(gpus=-0.5)), "spec.resources.gpus"),
        (DeploymentSpec(model="m", version="1", canary=Canary("2", 0)), "spec.canary.weight_percent"),
        (DeploymentSpec(model="m", version="1", canary=Canary("2", 100)), "spec.canary.weight_percent"),
        (DeploymentSpec(model="m", version="1", canary=Canary("1", 10)), "spec.canary.version"),
        (DeploymentSpec(model="m", canary=Canary("", 10)), "spec.canary.version"),
        (
            DeploymentSpec(model="m", min_replicas=1, max_replicas=2, autoscaling=Autoscaling(float("nan"))),
            "spec.autoscaling.target_ongoing_requests",
        ),
    ],
)
def test_bad_specs_name_the_field(spec: DeploymentSpec, field: str) -> None:
    assert field in fields(spec)


def test_scale_to_zero_needs_autoscaling() -> None:
    spec = validate_deployment_spec(DeploymentSpec(model="m", min_replicas=0, max_replicas=3, autoscaling=AUTO), 1)
    assert spec.replica_bounds == (0, 3)


def test_every_violation_is_reported() -> None:
    bad = DeploymentSpec(model="m", min_replicas=-1, batching=Batching(max_batch_size=5000))
    assert {"spec.min_replicas", "spec.batching.max_batch_size"} <= set(fields(bad))


def test_replica_ids_round_trip() -> None:
    rid = replica_id("my-g1-v2-3", 4, 7, 12)
    assert parse_replica_id(rid) == ("my-g1-v2-3", 4, 7, 12)
    assert parse_replica_id("job-abc-worker-0-0") is None


@pytest.mark.parametrize(
    ("total", "weight", "split"),
    [
        (0, 10, (0, 0)),
        (1, 50, (1, 0)),
        (2, 1, (1, 1)),
        (2, 99, (1, 1)),
        (10, 20, (8, 2)),
        (4, 0, (4, 0)),
        (5, 50, (3, 2)),
    ],
)
def test_canary_split(total: int, weight: int, split: tuple[int, int]) -> None:
    assert split_replicas(total, weight) == split


def test_without_autoscaling_min_replicas_run() -> None:
    scaler = Autoscaler()
    assert scaler.target("d", Autoscaling(), 0, 1, 0.0) == 1
    assert scaler.target("d", Autoscaling(), 3, 3, 0.0) == 3


def test_scale_from_zero_is_immediate() -> None:
    scaler = Autoscaler()
    assert scaler.target("d", AUTO, 0, 4, 0.0) == 0
    scaler.report("gw", {"d": 0.5}, 1.0)
    assert scaler.target("d", AUTO, 0, 4, 1.0) == 1


def test_upscale_waits_for_the_delay_and_clamps() -> None:
    scaler = Autoscaler()
    assert scaler.target("d", AUTO, 1, 3, 0.0) == 1
    scaler.report("gw", {"d": 100.0}, 0.0)
    assert scaler.target("d", AUTO, 1, 3, 0.0) == 1
    assert scaler.target("d", AUTO, 1, 3, 1.9) == 1
    assert scaler.target("d", AUTO, 1, 3, 2.0) == 3  # clamped to max


def test_a_dip_resets_the_upscale_delay() -> None:
    scaler = Autoscaler()
    scaler.report("gw", {"d": 6.0}, 0.0)
    assert scaler.target("d", AUTO, 1, 5, 0.0) == 1
    scaler.report("gw", {"d": 1.0}, 1.0)
    assert scaler.target("d", AUTO, 1, 5, 1.0) == 1
    scaler.report("gw", {"d": 6.0}, 1.5)
    assert scaler.target("d", AUTO, 1, 5, 3.0) == 1  # demand seen high again from 3.0 on
    assert scaler.target("d", AUTO, 1, 5, 4.9) == 1
    assert scaler.target("d", AUTO, 1, 5, 5.0) == 3


def test_downscale_waits_longer_and_reaches_min() -> None:
    scaler = Autoscaler(report_ttl_s=1000)
    scaler.report("gw", {"d": 8.0}, 0.0)
    scaler.target("d", AUTO, 0, 4, 0.0)
    assert scaler.target("d", AUTO, 0, 4, 0.0) == 1  # from zero at once
    assert scaler.target("d", AUTO, 0, 4, 2.0) == 4
    scaler.report("gw", {"d": 0.0}, 3.0)
    assert scaler.target("d", AUTO, 0, 4, 3.0) == 4
    assert scaler.target("d", AUTO, 0, 4, 32.9) == 4
    assert scaler.target("d", AUTO, 0, 4, 33.0) == 0


def test_gateways_add_up_and_silent_ones_are_dropped() -> None:
    scaler = Autoscaler(report_ttl_s=10)
    scaler.report("a", {"d": 2.0}, 0.0)
    scaler.report("b", {"d": 3.0}, 5.0)
    assert scaler.ongoing("d", 6.0) == 5.0
    assert scaler.ongoing("d", 10.5) == 3.0
    assert scaler.ongoing("d", 16.0) == 0.0


def test_bounds_changed_by_an_update_apply_at_once() -> None:
    scaler = Autoscaler()
    assert scaler.target("d", AUTO, 2, 4, 0.0) == 2
    assert scaler.target("d", AUTO, 3, 4, 0.1) == 3
    assert scaler.target("d", AUTO, 0, 1, 0.2) == 1
