"""The scheduler's policy core (``core.policy``), pure: quotas, borrowing, fair ordering, gangs, infeasible
requests, with an injected clock and a pool given as plain numbers."""

from __future__ import annotations

import dataclasses
import math

import pytest

from services.scheduler.core.policy import (
    NONE,
    UNLIMITED,
    Candidate,
    FairShare,
    Resources,
    Tenant,
    check_feasible,
    choose_victims,
    gang_demand,
    plan_admission,
    replica_demand,
    validate_quota,
)
from shared.errors import FailedPrecondition

POOL = dataclasses.replace(UNLIMITED, cpus=8, jobs=10)


def cpus(n: float) -> Resources:
    return Resources(cpus=n, jobs=1)


def job(job_id: str, tenant: str, demand: float, *, priority: int = 0, seq: int = 0) -> Candidate:
    return Candidate(job_id, tenant, priority, seq, cpus(demand))


def plan(queue: list[Candidate], tenants: dict[str, Tenant], usage: dict[str, Resources] | None = None, **kw):  # type: ignore[no-untyped-def]
    shares = kw.pop("shares", {})
    return plan_admission(
        queue,
        lambda name: tenants.get(name) or Tenant(name),
        usage or {},
        kw.pop("capacity", POOL),
        lambda tenant: shares.get(tenant.name, 0.0),
    )


def quota(n: float, borrow: float = 0.0) -> dict[str, Resources]:
    return {
        "quota": dataclasses.replace(UNLIMITED, cpus=n),
        "borrowing_limit": dataclasses.replace(NONE, cpus=borrow),
    }


def test_a_tenant_at_its_quota_waits_without_holding_back_others() -> None:
    tenants = {"a": Tenant("a", **quota(2)), "b": Tenant("b", **quota(6))}
    queue = [job("a1", "a", 2, seq=0), job("a2", "a", 2, seq=1), job("b1", "b", 2, seq=2)]
    decided = plan(queue, tenants)
    assert [c.id for c in decided.admit] == ["a1", "b1"]
    assert "tenant 'a' is at its quota: 2 CPUs in use of 2 CPUs; the job needs 2 CPUs" in decided.waiting["a2"]


def test_borrowing_up_to_the_limit_only() -> None:
    tenants = {"a": Tenant("a", **quota(2, borrow=2))}
    queue = [job(f"a{i}", "a", 1, seq=i) for i in range(6)]
    decided = plan(queue, tenants)
    assert [c.id for c in decided.admit] == ["a0", "a1", "a2", "a3"]  # 2 of its own, 2 borrowed
    assert "plus its borrowing limit (2 CPUs)" in decided.waiting["a4"]


def test_usage_already_placed_counts_replicas_too() -> None:
    tenants = {"a": Tenant("a", **quota(4))}
    placed = {"a": replica_demand(3, 1.0, 0.0, 0.0)}
    decided = plan([job("a1", "a", 2)], tenants, placed)
    assert decided.admit == [] and "3 CPUs in use of 4 CPUs" in decided.waiting["a1"]


def test_priority_first_then_fair_share_then_submission_order() -> None:
    queue = [
        job("a-old", "a", 1, seq=0),
        job("b-new", "b", 1, seq=5),
        job("a-urgent", "a", 1, priority=10, seq=9),
    ]
    # a used much recently; b little: among equal priorities b goes first, but priority beats fairness.
    decided = plan(queue, {}, shares={"a": 100.0, "b": 1.0})
    assert [c.id for c in decided.admit] == ["a-urgent", "b-new", "a-old"]


def test_one_pass_alternates_between_tenants_of_equal_share() -> None:
    queue = [job(f"a{i}", "a", 1, seq=i) for i in range(3)] + [job(f"b{i}", "b", 1, seq=10 + i) for i in range(3)]
    decided = plan(queue, {})
    assert [c.id for c in decided.admit] == ["a0", "b0", "a1", "b1", "a2", "b2"]


def test_a_gang_that_does_not_fit_the_pool_holds_back_the_jobs_after_it() -> None:
    # All or nothing: the 6-CPU gang does not fit beside 4 placed CPUs, and a small job must not slip past
    # it (it would be starved forever by a stream of small jobs).
    queue = [job("big", "a", 6, seq=0), job("small", "b", 1, seq=1)]
    decided = plan(queue, {}, {"c": cpus(4)})
    assert decided.admit == []
    assert decided.waiting["big"].startswith("the pool is full: 4 CPUs in use of 8 CPUs; the job needs 6 CPUs")
    assert "waiting behind job big" in decided.waiting["small"]


def test_the_running_jobs_cap_is_a_pool_dimension() -> None:
    capacity = dataclasses.replace(POOL, jobs=1)
    decided = plan([job("a", "a", 1, seq=0), job("b", "b", 1, seq=1)], {}, capacity=capacity)
    assert [c.id for c in decided.admit] == ["a"]
    assert "running jobs" in decided.waiting["b"]


def test_fair_share_decays_with_its_half_life() -> None:
    now = [0.0]
    fair = FairShare(half_life_s=10.0, clock=lambda: now[0])
    heavy, light = Tenant("heavy"), Tenant("light", quota=dataclasses.replace(UNLIMITED, cpus=4))
    now[0] = 10.0
    fair.observe({"heavy": cpus(4), "light": cpus(4)})
    assert fair.share(heavy) == pytest.approx(40.0)
    assert fair.share(light) == pytest.approx(10.0)  # per CPU of its quota
    now[0] = 20.0
    fair.observe({})  # nothing held for one half-life: halved
    assert fair.share(heavy) == pytest.approx(20.0)
    now[0] = 120.0
    fair.observe({})
    assert fair.share(heavy) < 0.05


def test_requests_that_could_never_run_are_refused() -> None:
    tenant = Tenant("a", **quota(4, borrow=2))
    check_feasible(cpus(6), tenant, POOL)
    with pytest.raises(FailedPrecondition, match="needs 9 CPUs; the whole pool has 8 CPUs"):
        check_feasible(cpus(9), tenant, POOL)
    with pytest.raises(FailedPrecondition, match=r"tenant 'a' may hold at most 6 CPUs"):
        check_feasible(cpus(7), tenant, POOL)


def test_gang_demand_counts_every_member_and_one_cpu_for_none() -> None:
    demand = gang_demand([(2, 1.5, 0.0, 100.0), (3, 0.0, 1.0, 0.0)])
    assert demand == Resources(cpus=6.0, gpus=3.0, memory_bytes=200.0, jobs=1)


def test_quota_validation_and_json_round_trip() -> None:
    bad = Resources(cpus=-1, gpus=math.nan)
    assert [f for f, _ in validate_quota(bad, "tenant.quota")] == ["tenant.quota.cpus", "tenant.quota.gpus"]
    limit = dataclasses.replace(UNLIMITED, cpus=4, replicas=2)
    assert Resources.from_dict(limit.to_dict()) == limit
    assert limit.to_dict()["gpus"] is None


def test_preemption_takes_lower_priorities_newest_first_and_no_more_than_needed() -> None:
    running = [job("low-old", "b", 2, priority=-1, seq=1), job("low-new", "b", 2, priority=-1, seq=2)]
    running += [job("same", "c", 4, priority=5, seq=0)]
    usage = {"b": cpus(4), "c": cpus(4)}
    head = job("urgent", "a", 2, priority=5, seq=9)
    assert plan([head], {}, usage).blocked == head
    victims = choose_victims(head, running, lambda n: Tenant(n), usage, POOL)
    assert [v.id for v in victims] == ["low-new"]  # equal priorities are never preempted
    too_big = job("huge", "a", 7, priority=5, seq=9)
    assert choose_victims(too_big, running, lambda n: Tenant(n), usage, POOL) == []  # could not fit: none


def test_borrowed_capacity_is_reclaimed_whatever_its_priority() -> None:
    tenants = {"owner": Tenant("owner", **quota(4)), "borrower": Tenant("borrower", **quota(2, borrow=4))}
    running = [job("borrowed", "borrower", 6, priority=50, seq=1)]
    usage = {"borrower": cpus(6), "owner": cpus(2)}
    head = job("owners-job", "owner", 2, priority=0, seq=5)
    victims = choose_victims(head, running, lambda n: tenants[n], usage, POOL)
    assert [v.id for v in victims] == ["borrowed"]
    # Beyond its own quota the owner has no claim on it.
    greedy = job("owners-big", "owner", 4, priority=0, seq=6)
    assert choose_victims(greedy, running, lambda n: tenants[n], usage, POOL) == []


def test_resource_arithmetic_covers_every_dimension() -> None:
    # The operators are spelled out field by field (speed): a new dimension must be added to each.
    from dataclasses import fields

    names = [f.name for f in fields(Resources)]
    a = Resources(**{name: 2.0 + i for i, name in enumerate(names)})
    b = Resources(**{name: 1.0 for name in names})
    assert [getattr(a + b, n) for n in names] == [3.0 + i for i in range(len(names))]
    assert [getattr(a - b, n) for n in names] == [1.0 + i for i in range(len(names))]
    assert [getattr(b.scaled(3), n) for n in names] == [3.0] * len(names)
    assert sorted(a.over(b)) == sorted(names)
