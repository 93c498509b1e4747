"""The gateway's coalescing of unary requests to one replica: alone they go at once, under load they leave
together as one InferMany call; errors come back per entry; a worker without InferMany gets plain calls."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import code_pb2, status_pb2
from maas.inference.v1 import worker_pb2 as wpb

from services.gateway.adapters.coalescer import Coalescer
from shared.errors import InvalidArgument, Unavailable
from shared.grpc.status import status_bytes


class Replica:
    """Answers InferMany with each payload reversed (or an error for payloads starting with b"bad")."""

    def __init__(self, implements_many: bool = True) -> None:
        self.implements_many = implements_many
        self.many_calls: list[int] = []
        self.single_calls = 0
        self.release = asyncio.Event()
        self.release.set()

    async def send_many(self, request: wpb.InferManyRequest, timeout: float | None) -> wpb.InferManyResponse:
        if not self.implements_many:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNIMPLEMENTED, grpc.aio.Metadata(), grpc.aio.Metadata())
        self.many_calls.append(len(request.entries))
        await self.release.wait()
        results = []
        for entry in request.entries:
            if entry.request.startswith(b"bad"):
                results.append(wpb.InferManyResponse.Result(status=status_bytes(InvalidArgument("input 'x': bad"))))
            else:
                results.append(wpb.InferManyResponse.Result(response=entry.request[::-1]))
        return wpb.InferManyResponse(results=results)

    async def send_one(self, payload: bytes, version: int, timeout: float | None) -> bytes:
        self.single_calls += 1
        await self.release.wait()
        return payload[::-1]


async def request(coalescer: Coalescer, replica: Replica, payload: bytes) -> bytes:
    if coalescer.has_room():
        return await coalescer.call(lambda: replica.send_one(payload, 1, None))
    return await coalescer.enqueue(payload, 1, 5.0)


async def test_a_request_alone_goes_at_once_as_a_plain_call() -> None:
    replica = Replica()
    coalescer = Coalescer(replica.send_many, replica.send_one, max_calls=2, max_bytes=1 << 20)
    assert await request(coalescer, replica, b"abc") == b"cba"
    assert replica.single_calls == 1 and replica.many_calls == []


async def test_requests_behind_the_calls_in_flight_leave_together_and_errors_stay_per_entry() -> None:
    replica = Replica()
    replica.release.clear()
    coalescer = Coalescer(replica.send_many, replica.send_one, max_calls=2, max_bytes=1 << 20)
    payloads = [b"p1", b"p2", b"p3", b"bad4", b"p5", b"p6"]
    tasks = [asyncio.create_task(request(coalescer, replica, p)) for p in payloads]
    await asyncio.sleep(0.01)
    assert replica.single_calls == 2  # the first two went at once; the rest wait
    replica.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[:3] == [b"1p", b"2p", b"3p"] and results[4:] == [b"5p", b"6p"]
    assert isinstance(results[3], InvalidArgument) and "input 'x'" in results[3].message
    # The four that waited left in one call when the first call returned.
    assert replica.many_calls == [4]
    assert coalescer.in_flight == 0


async def test_a_request_cancelled_while_waiting_is_never_sent() -> None:
    replica = Replica()
    replica.release.clear()
    coalescer = Coalescer(replica.send_many, replica.send_one, max_calls=1, max_bytes=1 << 20)
    first = asyncio.create_task(request(coalescer, replica, b"a"))
    await asyncio.sleep(0)
    waiting = asyncio.create_task(request(coalescer, replica, b"b"))
    kept = asyncio.create_task(request(coalescer, replica, b"c"))
    await asyncio.sleep(0.01)
    waiting.cancel()
    replica.release.set()
    assert await first == b"a" and await kept == b"c"
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert replica.many_calls == [1]


async def test_a_worker_without_infer_many_gets_plain_calls_from_then_on() -> None:
    replica = Replica(implements_many=False)
    replica.release.clear()
    coalescer = Coalescer(replica.send_many, replica.send_one, max_calls=1, max_bytes=1 << 20)
    tasks = [asyncio.create_task(request(coalescer, replica, p)) for p in (b"ab", b"cd", b"ef")]
    await asyncio.sleep(0.01)
    replica.release.set()
    assert await asyncio.gather(*tasks) == [b"ba", b"dc", b"fe"]
    assert coalescer.unsupported and coalescer.has_room()
    assert replica.single_calls == 3


async def test_waiting_requests_fail_over_when_the_replica_leaves() -> None:
    replica = Replica()
    replica.release.clear()
    coalescer = Coalescer(replica.send_many, replica.send_one, max_calls=1, max_bytes=1 << 20)
    first = asyncio.create_task(request(coalescer, replica, b"a"))
    await asyncio.sleep(0)
    waiting = asyncio.create_task(request(coalescer, replica, b"b"))
    await asyncio.sleep(0.01)
    coalescer.fail_waiting(Unavailable("replica left"))
    with pytest.raises(Unavailable):
        await waiting
    replica.release.set()
    assert await first == b"a"


def test_entry_statuses_round_trip_to_domain_errors() -> None:
    from shared.grpc.status import error_from_status

    error = error_from_status(status_bytes(InvalidArgument("input 'x': wrong shape")))
    assert isinstance(error, InvalidArgument) and error.message == "input 'x': wrong shape"
    assert status_pb2.Status.FromString(status_bytes(Unavailable("gone"))).code == code_pb2.UNAVAILABLE
