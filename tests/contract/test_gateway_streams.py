"""The gateway's StreamLink (``services/gateway/adapters/streams.py``) against a real grpc.aio server on
port 0 that serves ``InferenceWorker/InferStream`` with a small echo servicer defined here."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from maas.inference.v1 import worker_pb2 as wpb
from maas.inference.v1 import worker_pb2_grpc

from services.gateway.adapters.streams import StreamLink, StreamUnsupported
from shared.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from shared.grpc.status import status_bytes
from shared.kserve.metadata import STREAM_ACCEPTED

pytestmark = pytest.mark.timeout(30)

PATH = "/maas.inference.v1.InferenceWorker/InferStream"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class EchoWorker(worker_pb2_grpc.InferenceWorkerServicer):
    """Answers each entry with its payload reversed (an INVALID_ARGUMENT status for b"bad..."), but only
    while ``gate`` is set: the test decides when answers go back. Records what each message carried."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.messages: list[list[int]] = []  # entry ids, one list per message received
        self.cancels: list[list[int]] = []  # cancel ids, one list per message received
        self.entries: dict[int, wpb.InferStreamRequest.Entry] = {}
        self.events: list[str] = []  # "answer <id>" and "end" (the gateway ended its side), in order
        self.streams = 0
        self.end_stream: str | None = None  # "abort" or "return": end the current stream once, abruptly
        self.accept = asyncio.Event()  # the stream's initial metadata is sent once this is set
        self.accept.set()

    def seen(self) -> list[int]:
        return [i for ids in self.messages for i in ids]

    def cancelled(self) -> list[int]:
        return [i for ids in self.cancels for i in ids]

    @staticmethod
    def _result(entry: wpb.InferStreamRequest.Entry) -> wpb.InferStreamResponse.Result:
        if entry.request.startswith(b"bad"):
            return wpb.InferStreamResponse.Result(id=entry.id, status=status_bytes(InvalidArgument("input 'x': bad")))
        return wpb.InferStreamResponse.Result(id=entry.id, response=entry.request[::-1])

    async def InferStream(self, request_iterator: AsyncIterator[wpb.InferStreamRequest], context: Any) -> None:
        self.streams += 1
        queued: list[wpb.InferStreamRequest.Entry] = []

        async def read() -> None:
            async for message in request_iterator:
                self.messages.append([entry.id for entry in message.entries])
                self.cancels.append(list(message.cancel))
                for entry in message.entries:
                    self.entries[entry.id] = entry
                queued.extend(message.entries)
                queued[:] = [entry for entry in queued if entry.id not in message.cancel]
            self.events.append("end")

        reader = asyncio.create_task(read())  # before the metadata: it sees anything written too early
        try:
            await self.accept.wait()
            await context.send_initial_metadata((STREAM_ACCEPTED,))
            while True:
                if self.end_stream is not None:
                    how, self.end_stream = self.end_stream, None
                    if how == "abort":
                        await context.abort(grpc.StatusCode.UNAVAILABLE, "worker stopping")
                    return
                if queued and self.gate.is_set():
                    batch, queued[:] = list(queued), []
                    self.events.extend(f"answer {entry.id}" for entry in batch)
                    await context.write(wpb.InferStreamResponse(results=[self._result(e) for e in batch]))
                    continue
                if reader.done() and not queued:
                    return
                await asyncio.sleep(0.005)
        finally:
            reader.cancel()


def make_link(
    channel: grpc.aio.Channel, hold_after: int = 2, max_bytes: int = 1 << 20, max_outbox_bytes: int = 256 << 20
) -> StreamLink:
    infer_stream = channel.stream_stream(
        PATH,
        request_serializer=wpb.InferStreamRequest.SerializeToString,
        response_deserializer=wpb.InferStreamResponse.FromString,
    )
    return StreamLink(lambda: infer_stream(), max_bytes, hold_after, max_outbox_bytes)


async def until(condition: Callable[[], bool], what: str, timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


@dataclasses.dataclass
class Rig:
    worker: EchoWorker
    channel: grpc.aio.Channel
    tasks: list[asyncio.Task[bytes]] = dataclasses.field(default_factory=list)

    def link(self, hold_after: int = 2) -> StreamLink:
        return make_link(self.channel, hold_after)

    def start(self, link: StreamLink, payload: bytes, timeout: float | None = 5.0) -> asyncio.Task[bytes]:
        """A request in its own task (collected at teardown, so a failed test leaves none behind)."""
        task = asyncio.create_task(link.infer(payload, 1, timeout))
        self.tasks.append(task)
        return task


async def serve(worker: EchoWorker | None) -> tuple[grpc.aio.Server, grpc.aio.Channel]:
    server = grpc.aio.server()
    if worker is not None:
        worker_pb2_grpc.add_InferenceWorkerServicer_to_server(worker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    worker = EchoWorker()
    server, channel = await serve(worker)
    rig = Rig(worker, channel)
    yield rig
    for task in rig.tasks:
        task.cancel()
    await asyncio.gather(*rig.tasks, return_exceptions=True)
    await channel.close()
    await server.stop(None)


async def test_round_trip_error_and_entry_fields(rig: Rig) -> None:
    rig.worker.gate.set()
    link = rig.link()
    answer = await asyncio.wait_for(link.infer(b"hello", 7, 5.0, TRACEPARENT), 3)
    assert answer == b"olleh"
    entry = rig.worker.entries[1]
    assert (entry.request, entry.version, entry.timeout_s, entry.traceparent) == (b"hello", 7, 5.0, TRACEPARENT)
    with pytest.raises(InvalidArgument, match="input 'x': bad"):
        await asyncio.wait_for(link.infer(b"bad input", 3, None), 3)
    assert rig.worker.entries[2].timeout_s == 0.0  # no deadline
    assert rig.worker.streams == 1 and link.in_flight == 0


async def test_nothing_is_written_before_the_worker_accepts_the_stream(rig: Rig) -> None:
    rig.worker.accept.clear()
    rig.worker.gate.set()
    link = rig.link()
    a = rig.start(link, b"a")
    await until(lambda: rig.worker.streams == 1, "the stream opened")
    await asyncio.sleep(0.1)  # a window in which an early write would have arrived
    assert rig.worker.messages == []
    rig.worker.accept.set()
    assert await asyncio.wait_for(a, 3) == b"a"


async def test_requests_are_held_while_enough_are_in_flight(rig: Rig) -> None:
    link = rig.link(hold_after=1)
    a = rig.start(link, b"a")
    await until(lambda: rig.worker.messages == [[1]], "A written alone")
    rest = [rig.start(link, p) for p in (b"bc", b"cd", b"de")]
    await until(lambda: link.in_flight == 4, "B, C, D started")
    await asyncio.sleep(0.1)  # a window in which a held request would have been written
    assert rig.worker.messages == [[1]]
    rig.worker.gate.set()
    answers = await asyncio.wait_for(asyncio.gather(a, *rest), 3)
    assert answers == [b"a", b"cb", b"dc", b"ed"]
    assert rig.worker.messages == [[1], [2, 3, 4]]


async def test_held_requests_are_bounded_in_bytes(rig: Rig) -> None:
    # The worker is behind: what waits for it in the gateway is bounded, and a refusal says so at once.
    link = make_link(rig.channel, hold_after=1, max_outbox_bytes=10)
    a = rig.start(link, b"a")
    await until(lambda: rig.worker.messages == [[1]], "A written alone")
    held = [rig.start(link, p) for p in (b"12345", b"6789")]
    await until(lambda: link.in_flight == 3, "two requests held")
    with pytest.raises(ResourceExhausted, match="request bytes already wait"):
        await link.infer(b"abc", 1, 5.0)
    assert link.in_flight == 3  # the refused request left nothing behind
    rig.worker.gate.set()
    assert await asyncio.wait_for(asyncio.gather(a, *held), 3) == [b"a", b"54321", b"9876"]
    assert await asyncio.wait_for(link.infer(b"abc", 1, 5.0), 3) == b"cba"  # room again


async def test_nothing_is_held_with_hold_after_zero(rig: Rig) -> None:
    link = rig.link(hold_after=0)
    a = rig.start(link, b"a")
    await until(lambda: rig.worker.seen() == [1], "A written")
    rest = [rig.start(link, p) for p in (b"bc", b"cd", b"de")]
    await until(lambda: sorted(rig.worker.seen()) == [1, 2, 3, 4], "B, C, D written before A is answered")
    assert not a.done()
    rig.worker.gate.set()
    assert await asyncio.wait_for(asyncio.gather(a, *rest), 3) == [b"a", b"cb", b"dc", b"ed"]


async def test_a_held_request_cancelled_is_never_written(rig: Rig) -> None:
    link = rig.link(hold_after=1)
    a = rig.start(link, b"a")
    await until(lambda: rig.worker.seen() == [1], "A written")
    b = rig.start(link, b"b")
    await until(lambda: link.in_flight == 2, "B started")
    b.cancel()
    with pytest.raises(asyncio.CancelledError):
        await b
    rig.worker.gate.set()
    assert await asyncio.wait_for(a, 3) == b"a"
    assert await asyncio.wait_for(link.infer(b"c", 1, 5.0), 3) == b"c"  # everything before it was written
    assert 2 not in rig.worker.seen() and 2 not in rig.worker.cancelled()
    assert rig.worker.seen() == [1, 3]


async def test_a_sent_request_cancelled_sends_a_cancel(rig: Rig) -> None:
    link = rig.link()
    a = rig.start(link, b"a")
    await until(lambda: rig.worker.seen() == [1], "A written")
    a.cancel()
    with pytest.raises(asyncio.CancelledError):
        await a
    await until(lambda: rig.worker.cancelled() == [1], "a cancel frame for A")
    assert link.in_flight == 0


async def test_deadline_fails_the_request_and_cancels_it_at_the_worker(rig: Rig) -> None:
    link = rig.link()
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(link.infer(b"slow", 1, 0.2), 3)
    assert 0.15 < loop.time() - began < 1.0
    assert rig.worker.entries[1].timeout_s == pytest.approx(0.2)
    await until(lambda: rig.worker.cancelled() == [1], "a cancel frame for the expired request")


@pytest.mark.parametrize("how", ["abort", "return"])
async def test_a_broken_stream_fails_its_requests_and_the_next_opens_a_new_one(rig: Rig, how: str) -> None:
    link = rig.link()
    tasks = [rig.start(link, b"a"), rig.start(link, b"b")]
    await until(lambda: sorted(rig.worker.seen()) == [1, 2], "A and B written")
    rig.worker.end_stream = how
    for task in tasks:
        with pytest.raises(Unavailable):
            await asyncio.wait_for(task, 3)
    assert link.in_flight == 0
    rig.worker.gate.set()
    assert await asyncio.wait_for(link.infer(b"again", 1, 5.0), 3) == b"niaga"
    assert rig.worker.streams == 2


async def test_a_worker_without_infer_stream_is_unsupported() -> None:
    server, channel = await serve(None)  # no handlers at all: InferStream is UNIMPLEMENTED
    try:
        link = make_link(channel)
        results = await asyncio.wait_for(
            asyncio.gather(*(link.infer(b"x%d" % i, 1, 5.0) for i in range(3)), return_exceptions=True), 2
        )
        assert [type(r) for r in results] == [StreamUnsupported] * 3, results
        assert link.unsupported and link.in_flight == 0
    finally:
        await channel.close()
        await server.stop(None)


async def test_close_answers_the_request_in_flight_then_ends_the_stream(rig: Rig) -> None:
    link = rig.link()
    a = rig.start(link, b"a")
    await until(lambda: rig.worker.seen() == [1], "A written")
    link.close()
    await asyncio.sleep(0.05)  # a window in which ending our side too early would reach the worker
    rig.worker.gate.set()
    assert await asyncio.wait_for(a, 3) == b"a"
    await until(lambda: "end" in rig.worker.events, "the gateway's side ended")
    assert rig.worker.events == ["answer 1", "end"]
