"""Coalescing of unary inference requests to one replica under load.

Every request costs a gRPC call on both ends of the gateway -> worker hop, which on few cores is most of
what serving costs. So once ``max_calls`` unary calls are in flight to a replica, the next requests wait
here (they would wait in the replica's queue anyway, behind the batch it is computing) and leave together,
as one ``InferenceWorker/InferMany`` call, as soon as a call returns. A request alone never waits: below
``max_calls`` it goes out at once as a plain ``ModelInfer``.

A request cancelled while it waits here is dropped before it is sent; once sent in a shared call, its
computation goes on (the others in the call still want theirs) and only its answer is dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from maas.inference.v1 import worker_pb2 as wpb

from shared.errors import MaasError, Unavailable
from shared.grpc.status import error_from_status, from_rpc_error

Send = Callable[[wpb.InferManyRequest, float | None], Awaitable[wpb.InferManyResponse]]
SendOne = Callable[[bytes, int, float | None], Awaitable[bytes]]


@dataclass
class _Waiting:
    payload: bytes
    version: int
    deadline: float | None
    future: asyncio.Future[bytes]


@dataclass
class Coalescer:
    """The coalescing state of one replica.

    Args:
        send_many: Sends one ``InferMany`` request with a timeout (the longest any entry may still wait).
        send_one: Sends one request as a plain ``ModelInfer`` (payload, version, timeout): the fallback for
            a worker that does not know ``InferMany`` (an older release during a rolling upgrade).
        max_calls: Calls in flight to the replica before requests are held back and coalesced (>= 1).
        max_bytes: Bytes of request payload one ``InferMany`` call may carry (the message size limit).
    """

    send_many: Send
    send_one: SendOne
    max_calls: int
    max_bytes: int
    in_flight: int = 0
    unsupported: bool = False
    _waiting: list[_Waiting] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def has_room(self) -> bool:
        return self.unsupported or (self.in_flight < self.max_calls and not self._waiting)

    async def call(self, direct: Callable[[], Awaitable[bytes]]) -> bytes:
        """Runs ``direct`` (the plain unary call) counted as one call in flight; flushes waiters after."""
        self.in_flight += 1
        try:
            return await direct()
        finally:
            self.in_flight -= 1
            self._flush()

    async def enqueue(self, payload: bytes, version: int, timeout: float | None) -> bytes:
        """Waits for a shared call; returns the entry's response bytes or raises its domain error."""
        loop = asyncio.get_running_loop()
        entry = _Waiting(
            payload, version, None if timeout is None else time.monotonic() + timeout, loop.create_future()
        )
        self._waiting.append(entry)
        self._flush()
        try:
            return await entry.future
        except asyncio.CancelledError:
            if entry in self._waiting:
                self._waiting.remove(entry)
            raise

    def fail_waiting(self, error: MaasError) -> None:
        """The replica left the endpoints: what waits here is retried elsewhere by the caller."""
        waiting, self._waiting = self._waiting, []
        for entry in waiting:
            if not entry.future.done():
                entry.future.set_exception(error)

    def _flush(self) -> None:
        while self._waiting and self.in_flight < self.max_calls:
            batch: list[_Waiting] = []
            size = 0
            while self._waiting and (not batch or size + len(self._waiting[0].payload) <= self.max_bytes):
                entry = self._waiting.pop(0)
                if entry.future.done():
                    continue
                batch.append(entry)
                size += len(entry.payload)
            if not batch:
                return
            self.in_flight += 1
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Waiting]) -> None:
        try:
            now = time.monotonic()
            entries = [
                wpb.InferManyRequest.Entry(
                    request=e.payload,
                    version=e.version,
                    timeout_s=0.0 if e.deadline is None else max(1e-3, e.deadline - now),
                )
                for e in batch
            ]
            deadlines = [e.deadline for e in batch]
            timeout = None if None in deadlines else max(1e-3, max(d for d in deadlines if d is not None) - now)
            try:
                response = await self.send_many(wpb.InferManyRequest(entries=entries), timeout)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    self.unsupported = True
                    await asyncio.gather(*(self._send_alone(e) for e in batch))
                    return
                error = from_rpc_error(exc)
                for e in batch:
                    _settle(e.future, error=error)
                return
            except Exception as exc:  # noqa: BLE001 - every waiter must hear of it, or it would hang
                for e in batch:
                    _settle(e.future, error=Unavailable(f"the call to the replica failed: {type(exc).__name__}"))
                return
            for e, result in zip(batch, response.results, strict=False):
                if result.status:
                    _settle(e.future, error=error_from_status(result.status))
                else:
                    _settle(e.future, value=result.response)
            for e in batch[len(response.results) :]:
                _settle(e.future, error=Unavailable("the replica answered fewer entries than it was sent"))
        finally:
            self.in_flight -= 1
            self._flush()

    async def _send_alone(self, entry: _Waiting) -> None:
        timeout = None if entry.deadline is None else max(1e-3, entry.deadline - time.monotonic())
        try:
            _settle(entry.future, value=await self.send_one(entry.payload, entry.version, timeout))
        except MaasError as exc:
            _settle(entry.future, error=exc)


def _settle(future: asyncio.Future[Any], *, value: bytes | None = None, error: MaasError | None = None) -> None:
    if future.done():
        return  # its client went away meanwhile
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
