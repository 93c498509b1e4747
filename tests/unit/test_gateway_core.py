"""The gateway's core with in-process fakes of its ports: no sockets, microseconds per request."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Collection, Mapping

import pytest

from services.gateway.core.load import LoadTracker, report_forever
from services.gateway.core.model import Deployment, Endpoint, ServedVersion
from services.gateway.core.router import Router
from services.gateway.core.service import Gateway
from services.gateway.core.statistics import BatchStats, Duration, VersionStats, merge
from services.gateway.core.table import EndpointTable
from shared.artifacts import Signature, TensorSpec
from shared.errors import DeadlineExceeded, NotFound, ResourceExhausted, Unavailable
from tests.support.gateway import RecordingLoadSink

SIG = Signature(inputs=(TensorSpec("x", "FP32", (-1, 2)),), outputs=(TensorSpec("y", "FP32", (-1, 1)),))


def served(version: int, *aliases: str) -> ServedVersion:
    return ServedVersion(version=version, signature=SIG, max_batch_size=8, aliases=aliases)


def deployment(
    name: str = "m", addresses: tuple[str, ...] = ("a:1",), version: int = 1, **fields: object
) -> Deployment:
    versions = fields.pop("versions", {version: served(version)})
    return Deployment(
        name=name,
        versions=versions,  # type: ignore[arg-type]
        endpoints=tuple(Endpoint(a, version) for a in addresses),
        default_version=version,
        **fields,  # type: ignore[arg-type]
    )


class FakeReplicas:
    """Answers ``address|version``; addresses in ``down`` are Unavailable, ``errors`` raise what they map to."""

    def __init__(self) -> None:
        self.down: set[str] = set()
        self.errors: dict[str, Exception] = {}
        self.calls: list[tuple[str, int, float | None]] = []
        self.gate: asyncio.Event | None = None
        self.retained: set[str] = set()

    async def infer(self, address: str, version: int, payload: bytes, timeout: float | None) -> bytes:
        self.calls.append((address, version, timeout))
        if self.gate is not None:
            await self.gate.wait()
        if address in self.down:
            raise Unavailable(f"{address} is gone")
        if address in self.errors:
            raise self.errors[address]
        return f"{address}|{version}|".encode() + payload

    async def stream(self, address: str, version: int, payload: bytes, timeout: float | None) -> AsyncIterator[bytes]:
        self.calls.append((address, version, timeout))
        if address in self.down:
            raise Unavailable(f"{address} is gone")
        for i in range(3):
            yield f"{address}|{i}".encode()

    async def statistics(self, address: str, timeout: float) -> list[VersionStats]:
        if address in self.down:
            raise Unavailable("gone")
        return [VersionStats("reg", "1", last_inference=len(address), inference_count=2, success=Duration(2, 20))]

    def retain(self, addresses: Collection[str]) -> None:
        self.retained = set(addresses)


def make(
    *deployments: Deployment, retries: int = 2, max_hold_s: float = 5.0, max_held: int = 100
) -> tuple[Gateway, FakeReplicas]:
    table = EndpointTable()
    replicas = FakeReplicas()
    gateway = Gateway(table, replicas, LoadTracker(), retries=retries, max_hold_s=max_hold_s, max_held=max_held)
    gateway.apply_snapshot(list(deployments))
    return gateway, replicas


# -- resolution -------------------------------------------------------------------------------------------


def test_resolution_by_number_alias_and_default() -> None:
    d = deployment(versions={1: served(1, "stable"), 2: served(2, "latest")}, addresses=())
    gateway, _ = make(d)
    assert gateway.resolve("m", "2").version == 2
    assert gateway.resolve("m", "stable").version == 1
    assert gateway.resolve("m", "").version == 1


def test_unknown_model_and_version_name_what_exists() -> None:
    gateway, _ = make(deployment("a"), deployment("b", versions={3: served(3, "prod"), 4: served(4)}))
    with pytest.raises(NotFound, match=r"model 'x' is not deployed \(deployed: a, b\)"):
        gateway.resolve("x", "")
    with pytest.raises(NotFound, match=r"no version '9' \(served: 3 \(prod\), 4\)"):
        gateway.resolve("b", "9")
    with pytest.raises(NotFound, match="no version 'staging'"):
        gateway.resolve("b", "staging")


def test_canary_split_follows_the_weight_and_named_versions_never_split() -> None:
    d = deployment(versions={1: served(1), 2: served(2, "next")}, canary_version=2, canary_weight_percent=20)
    rng = random.Random(5)
    table = EndpointTable(rand=rng.random)
    table.apply([d])
    picks = [table.resolve("m", "").version for _ in range(10_000)]
    share = picks.count(2) / len(picks)
    assert 0.18 < share < 0.22
    assert {table.resolve("m", "1").version for _ in range(200)} == {1}
    assert {table.resolve("m", "next").version for _ in range(200)} == {2}


# -- routing ----------------------------------------------------------------------------------------------


def test_power_of_two_choices_picks_the_less_loaded() -> None:
    router = Router(random.Random(1))
    endpoints = [Endpoint("a", 1), Endpoint("b", 1)]
    for _ in range(5):
        router.acquire("a")
    assert all(router.pick(endpoints).address == "b" for _ in range(50))  # type: ignore[union-attr]
    # Over many endpoints the busiest one is never picked (it loses every pair it is drawn in).
    many = [Endpoint(str(i), 1) for i in range(6)]
    for _ in range(3):
        router.acquire("0")
    assert "0" not in {router.pick(many).address for _ in range(500)}  # type: ignore[union-attr]
    assert router.pick(endpoints, excluded={"a", "b"}) is None
    router.release("a")
    assert router.outstanding("a") == 4


async def test_requests_spread_by_outstanding_count() -> None:
    gateway, replicas = make(deployment(addresses=("a:1", "b:1")))
    replicas.gate = asyncio.Event()
    route = gateway.resolve("m", "")
    calls = [asyncio.create_task(gateway.infer(route, b"p", 5.0)) for _ in range(10)]
    await asyncio.sleep(0)
    counts = [a for a, _, _ in replicas.calls]
    assert counts.count("a:1") == 5 and counts.count("b:1") == 5
    replicas.gate.set()
    await asyncio.gather(*calls)


# -- retries and holds ------------------------------------------------------------------------------------


async def test_unavailable_is_retried_on_another_replica() -> None:
    gateway, replicas = make(deployment(addresses=("a:1", "b:1", "c:1")))
    replicas.down = {"a:1", "b:1"}
    for _ in range(20):
        assert (await gateway.infer(gateway.resolve("m", ""), b"p", 5.0)).startswith(b"c:1|1|")
    assert gateway.load.ongoing("m") == 0


async def test_retries_are_bounded() -> None:
    gateway, replicas = make(deployment(addresses=("a:1", "b:1", "c:1")), retries=1)
    replicas.down = {"a:1", "b:1", "c:1"}
    with pytest.raises(Unavailable, match="2 replicas were unavailable"):
        await gateway.infer(gateway.resolve("m", ""), b"p", 5.0)
    assert len(replicas.calls) == 2


async def test_other_errors_are_not_retried() -> None:
    gateway, replicas = make(deployment(addresses=("a:1", "b:1")))
    replicas.errors = {"a:1": ResourceExhausted("full"), "b:1": ResourceExhausted("full")}
    with pytest.raises(ResourceExhausted):
        await gateway.infer(gateway.resolve("m", ""), b"p", 5.0)
    assert len(replicas.calls) == 1


async def test_held_until_an_endpoint_appears_and_reported_at_once() -> None:
    gateway, replicas = make(deployment(addresses=()))
    sink = RecordingLoadSink()
    reporter = asyncio.create_task(report_forever(gateway.load, sink, 60.0, lambda: ["m"]))
    try:
        call = asyncio.create_task(gateway.infer(gateway.resolve("m", ""), b"p", 5.0))
        # The interval is a minute: only the hold's own kick can produce this report.
        await asyncio.wait_for(sink.reported.wait(), 1.0)
        assert sink.reports[-1] == {"m": 1.0}
        assert not call.done()
        gateway.apply_snapshot([deployment(addresses=("z:1",))])
        assert (await asyncio.wait_for(call, 1.0)).startswith(b"z:1|1|")
        assert replicas.retained == {"z:1"}
    finally:
        reporter.cancel()


async def test_failed_replica_then_hold_then_new_replica() -> None:
    gateway, replicas = make(deployment(addresses=("a:1",)))
    replicas.down = {"a:1"}
    call = asyncio.create_task(gateway.infer(gateway.resolve("m", ""), b"p", 5.0))
    await asyncio.sleep(0.01)
    assert not call.done()
    gateway.apply_snapshot([deployment(addresses=("b:1",))])
    assert (await asyncio.wait_for(call, 1.0)).startswith(b"b:1|")


async def test_hold_expires() -> None:
    gateway, _ = make(deployment(addresses=()), max_hold_s=0.05)
    with pytest.raises(DeadlineExceeded, match="within the request's deadline"):
        await gateway.infer(gateway.resolve("m", ""), b"p", 0.05)
    with pytest.raises(Unavailable, match=r"within 0\.05 s"):
        await gateway.infer(gateway.resolve("m", ""), b"p", None)
    assert gateway.load.ongoing("m") == 0


async def test_held_requests_are_capped() -> None:
    gateway, _ = make(deployment(addresses=()), max_held=2)
    held = [asyncio.create_task(gateway.infer(gateway.resolve("m", ""), b"p", 5.0)) for _ in range(2)]
    await asyncio.sleep(0.01)
    assert gateway.held == 2
    with pytest.raises(ResourceExhausted, match="2 requests already wait"):
        await gateway.infer(gateway.resolve("m", ""), b"p", 5.0)
    gateway.apply_snapshot([deployment(addresses=("a:1",))])
    assert all(answer.startswith(b"a:1|") for answer in await asyncio.wait_for(asyncio.gather(*held), 1.0))
    assert gateway.held == 0 and gateway.load.ongoing("m") == 0


async def test_rolling_update_while_held_moves_to_the_new_default() -> None:
    gateway, _ = make(deployment(addresses=(), version=1))
    call = asyncio.create_task(gateway.infer(gateway.resolve("m", ""), b"p", 5.0))
    await asyncio.sleep(0.01)
    gateway.apply_snapshot([deployment(addresses=("b:1",), version=2)])
    assert (await asyncio.wait_for(call, 1.0)).startswith(b"b:1|2|")
    # A version named explicitly that leaves the deployment is NotFound, not silently replaced.
    gateway2, _ = make(deployment(addresses=(), version=1))
    pinned = asyncio.create_task(gateway2.infer(gateway2.resolve("m", "1"), b"p", 5.0))
    await asyncio.sleep(0.01)
    gateway2.apply_snapshot([deployment(addresses=("b:1",), version=2)])
    with pytest.raises(NotFound):
        await pinned


async def test_deadline_is_passed_down() -> None:
    gateway, replicas = make(deployment())
    await gateway.infer(gateway.resolve("m", ""), b"p", 2.0)
    await gateway.infer(gateway.resolve("m", ""), b"p", None)
    assert 1.5 < replicas.calls[0][2] <= 2.0  # type: ignore[operator]
    assert replicas.calls[1][2] is None


async def test_stream_retries_before_the_first_message() -> None:
    gateway, replicas = make(deployment(addresses=("a:1", "b:1")))
    replicas.down = {"a:1"}
    for _ in range(5):
        messages = [m async for m in gateway.stream(gateway.resolve("m", ""), b"p", 5.0)]
        assert messages == [b"b:1|0", b"b:1|1", b"b:1|2"]
    assert gateway.load.ongoing("m") == 0


def test_model_ready() -> None:
    gateway, _ = make(deployment(addresses=("a:1",)), deployment("cold", addresses=()))
    assert gateway.model_ready("m", "") and gateway.model_ready("m", "1")
    assert not gateway.model_ready("m", "2") and not gateway.model_ready("cold", "")
    assert not gateway.model_ready("nope", "")


# -- load reporting ---------------------------------------------------------------------------------------


async def test_load_is_reported_periodically_with_idle_deployments_at_zero() -> None:
    tracker = LoadTracker()
    sink = RecordingLoadSink()
    tracker.begin("a")
    tracker.begin("a")
    tracker.begin("b")
    tracker.end("b")
    task = asyncio.create_task(report_forever(tracker, sink, 0.01, lambda: ["a", "b", "c"]))
    await asyncio.sleep(0.05)
    task.cancel()
    assert len(sink.reports) >= 2
    assert sink.reports[-1] == {"a": 2.0, "b": 0.0, "c": 0.0}


async def test_a_failing_sink_does_not_stop_reporting() -> None:
    class Flaky:
        calls = 0

        async def report(self, ongoing: Mapping[str, float]) -> None:
            Flaky.calls += 1
            raise Unavailable("scheduler down")

    task = asyncio.create_task(report_forever(LoadTracker(), Flaky(), 0.01, lambda: []))
    await asyncio.sleep(0.05)
    task.cancel()
    assert Flaky.calls >= 2


# -- statistics -------------------------------------------------------------------------------------------


def test_statistics_merge_sums_and_merges_batches() -> None:
    a = VersionStats("reg", "1", last_inference=5, inference_count=3, execution_count=2, success=Duration(3, 30))
    a.batch_stats = {1: BatchStats(1, compute_infer=Duration(1, 10)), 2: BatchStats(2, compute_infer=Duration(1, 20))}
    b = VersionStats("reg", "1", last_inference=9, inference_count=1, execution_count=1, success=Duration(1, 5))
    b.batch_stats = {1: BatchStats(1, compute_infer=Duration(1, 7))}
    other = VersionStats("reg", "7", inference_count=100)
    merged = merge("m", [1, 2], [[a], [b, other]])
    assert [(s.name, s.version) for s in merged] == [("m", "1"), ("m", "2")]
    one = merged[0]
    assert (one.last_inference, one.inference_count, one.execution_count) == (9, 4, 3)
    assert one.success == Duration(4, 35)
    assert one.batch_stats[1].compute_infer == Duration(2, 17) and one.batch_stats[2].compute_infer == Duration(1, 20)
    assert merged[1].inference_count == 0


async def test_statistics_skip_replicas_that_fail() -> None:
    gateway, replicas = make(deployment(addresses=("a:1", "bb:1", "ccc:1")))
    replicas.down = {"ccc:1"}
    (stats,) = await gateway.statistics("m", "", 1.0)
    assert stats.inference_count == 4 and stats.last_inference == len("bb:1")
    with pytest.raises(NotFound):
        await gateway.statistics("nope", "", 1.0)


# -- tenants ----------------------------------------------------------------------------------------------


def _not_deployed(call: object, *args: object) -> str:
    with pytest.raises(NotFound) as info:
        call(*args)  # type: ignore[operator]
    return info.value.message


async def test_another_tenants_deployment_is_a_model_not_deployed() -> None:
    gateway, _ = make(deployment("m", tenant="a"), deployment("n", ("b:1",), tenant="b"))
    # To tenant b, "m" is exactly a model nobody deployed: the same words, and never listed.
    unknown = _not_deployed(gateway.resolve, "zzz", "", "b")
    assert unknown == "model 'zzz' is not deployed (deployed: n)"
    assert _not_deployed(gateway.resolve, "m", "", "b") == unknown.replace("zzz", "m")
    assert _not_deployed(gateway.lookup, "m", "", "b") == unknown.replace("zzz", "m")
    assert not gateway.model_ready("m", "", "b") and gateway.model_ready("n", "", "b")
    with pytest.raises(NotFound):
        await gateway.statistics("m", "", 1.0, "b")
    assert [s.name for s in await gateway.statistics("", "", 1.0, "b")] == ["n"]
    with pytest.raises(NotFound):
        await gateway.route("m", "", 1.0, "b")  # in sync: at once
    # The owner and the unscoped (admin, mesh, development mode) see it.
    assert gateway.resolve("m", "", "a").deployment.name == "m"
    assert gateway.resolve("m", "").deployment.name == "m"
    assert [s.name for s in await gateway.statistics("", "", 1.0)] == ["m", "n"]


async def test_another_tenants_model_is_held_like_an_unknown_one_while_out_of_sync() -> None:
    gateway, _ = make(deployment("m", tenant="a"), max_hold_s=0.05)
    gateway.table.mark_stale()
    # Answering at once would tell tenant b that "m" exists: it waits for a current snapshot as for "zzz".
    for name in ("m", "zzz"):
        with pytest.raises(Unavailable, match="not known to the gateway yet"):
            await gateway.route(name, "", None, "b")
        with pytest.raises(Unavailable, match="not known to the gateway yet"):
            await gateway.describe(name, "", None, "b")
    assert (await gateway.route("m", "", None, "a")).deployment.name == "m"
    held = asyncio.create_task(gateway.route("m", "", 5.0, "b"))
    await asyncio.sleep(0.01)
    gateway.apply_snapshot([deployment("m", tenant="a")])
    with pytest.raises(NotFound, match=r"model 'm' is not deployed \(deployed: none\)"):
        await held


async def test_a_held_request_stays_with_its_tenant() -> None:
    gateway, _ = make(deployment("m", addresses=(), tenant="a"))
    call = asyncio.create_task(gateway.infer(gateway.resolve("m", "", "a"), b"p", 5.0))
    await asyncio.sleep(0.01)
    # "m" was deleted and created again by tenant b while the request waited: it is not a's to use.
    gateway.apply_snapshot([deployment("m", addresses=("b:1",), tenant="b")])
    with pytest.raises(NotFound, match="model 'm' is not deployed"):
        await call
