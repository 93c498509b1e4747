"""A client of ``maas.paramserver.v1.ParameterServer``, and the tensor framing both sides share.

Tensors travel as a :class:`TensorHeader` followed by :class:`Blob` slices (at most 4 MiB each) of
each payload part, in order. :func:`frame_tensor` cuts an :class:`~shared.compression.Encoded` into
those messages; :class:`TensorAssembler` puts them back together and treats its input as hostile
(unknown tensors or parts, duplicate keys, offsets that do not add up, oversized slices or totals all
raise :class:`~shared.errors.InvalidArgument`). The shard's servicer uses the same two functions, so
the framing is defined in exactly one place.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import torch
from maas.paramserver.v1 import paramserver_pb2 as pb
from maas.paramserver.v1 import paramserver_pb2_grpc

from shared.artifacts import ArtifactError, Manifest, build_model
from shared.compression import CODECS, Encoded, EncodingError, decode
from shared.errors import Internal, InvalidArgument
from shared.grpc.channel import make_channel
from shared.grpc.status import from_rpc_error
from shared.settings import CommonSettings, MiB
from shared.sharding import ShardPlan, plan_for_state

__all__ = [
    "MAX_BLOB_BYTES",
    "SERVICE",
    "ParamServerClient",
    "PullResult",
    "PushResult",
    "TensorAssembler",
    "frame_tensor",
    "frame_tensors",
    "plan_for_job",
]

SERVICE = pb.DESCRIPTOR.services_by_name["ParameterServer"]

#: Largest Blob.data: far below the 8 MiB message limit, so one blob plus its envelope always fits.
MAX_BLOB_BYTES = 4 * MiB

#: What a ShardConfig's max_piece_elements of 0 means (must match the shard's default).


def frame_tensor(
    key: str, encoded: Encoded, *, version: int = 0, blob_bytes: int = MAX_BLOB_BYTES
) -> Iterator[pb.TensorHeader | pb.Blob]:
    """The messages that carry one encoded tensor: its header, then each part's bytes in slices.

    Slices are taken lazily (a memoryview, one copy per blob), so framing a large tensor costs no more
    than one blob at a time on top of the payload.
    """
    if not 0 < blob_bytes <= MAX_BLOB_BYTES:
        raise ValueError(f"blob_bytes must be in (0, {MAX_BLOB_BYTES}], got {blob_bytes}")
    yield pb.TensorHeader(
        key=key,
        codec=encoded.codec,
        shape=list(encoded.shape),
        meta={name: float(value) for name, value in encoded.meta.items()},
        part_bytes={part: len(data) for part, data in encoded.payload.items()},
        version=version,
    )
    for part in sorted(encoded.payload):
        view = memoryview(encoded.payload[part])
        for offset in range(0, len(view), blob_bytes):
            yield pb.Blob(key=key, part=part, offset=offset, data=bytes(view[offset : offset + blob_bytes]))


def frame_tensors(
    tensors: Mapping[str, Encoded], versions: Mapping[str, int] | None = None, *, blob_bytes: int = MAX_BLOB_BYTES
) -> Iterator[pb.TensorHeader | pb.Blob]:
    """:func:`frame_tensor` for every tensor, in key order."""
    for key in sorted(tensors):
        yield from frame_tensor(key, tensors[key], version=(versions or {}).get(key, 0), blob_bytes=blob_bytes)


@dataclass
class _Pending:
    header: pb.TensorHeader
    chunks: dict[str, list[bytes]]
    received: dict[str, int]


class TensorAssembler:
    """Rebuilds tensors from :func:`frame_tensor` messages, validating everything.

    Args:
        limits: Key -> the most payload bytes that tensor may declare; when given, any other key is
            refused as soon as its header arrives (before its bytes are read).
        max_total_bytes: The most payload bytes all tensors together may declare.
        max_blob_bytes: The largest slice accepted.

    Raises (from :meth:`add` and :meth:`finish`):
        InvalidArgument: On a malformed, unexpected or incomplete message sequence.
    """

    def __init__(
        self,
        *,
        limits: Mapping[str, int] | None = None,
        max_total_bytes: int | None = None,
        max_blob_bytes: int = MAX_BLOB_BYTES,
    ) -> None:
        self._limits = limits
        self._max_total = max_total_bytes
        self._max_blob = max_blob_bytes
        self._tensors: dict[str, _Pending] = {}
        self.declared_bytes = 0
        self.received_bytes = 0

    def __len__(self) -> int:
        return len(self._tensors)

    def add(self, message: pb.TensorHeader | pb.Blob) -> None:
        if isinstance(message, pb.TensorHeader):
            self.add_header(message)
        elif isinstance(message, pb.Blob):
            self.add_blob(message)
        else:
            raise InvalidArgument(f"expected a TensorHeader or a Blob, got {type(message).__name__}")

    def add_header(self, header: pb.TensorHeader) -> None:
        key = header.key
        if not key:
            raise InvalidArgument.field("tensor.key", "must not be empty")
        if key in self._tensors:
            raise InvalidArgument.field(key, "sent twice in one stream")
        if self._limits is not None and key not in self._limits:
            raise InvalidArgument.field(key, "is not a piece of this shard")
        if header.codec not in CODECS:
            raise InvalidArgument.field(key, f"unknown codec {header.codec!r}; known codecs: {', '.join(CODECS)}")
        sizes = dict(header.part_bytes)
        if any(size < 0 for size in sizes.values()):
            raise InvalidArgument.field(key, f"negative part size in {sizes}")
        declared = sum(sizes.values())
        if self._limits is not None and declared > self._limits[key]:
            raise InvalidArgument.field(
                key, f"declares {declared} payload bytes, more than any encoding of it needs ({self._limits[key]})"
            )
        if self._max_total is not None and self.declared_bytes + declared > self._max_total:
            raise InvalidArgument.field(key, f"the stream declares more than {self._max_total} payload bytes")
        self.declared_bytes += declared
        self._tensors[key] = _Pending(header, {part: [] for part in sizes}, dict.fromkeys(sizes, 0))

    def add_blob(self, blob: pb.Blob) -> None:
        pending = self._tensors.get(blob.key)
        if pending is None:
            raise InvalidArgument.field("blob.key", f"{blob.key!r} has no TensorHeader before its blobs")
        sizes = pending.header.part_bytes
        if blob.part not in sizes:
            raise InvalidArgument.field(blob.key, f"unknown payload part {blob.part!r}; declared: {sorted(sizes)}")
        size = len(blob.data)
        if size > self._max_blob:
            raise InvalidArgument.field(blob.key, f"blob of {size} bytes; blobs are at most {self._max_blob} bytes")
        have = pending.received[blob.part]
        if blob.offset != have:
            raise InvalidArgument.field(
                blob.key, f"part {blob.part!r}: blob at offset {blob.offset}, expected {have} (blobs come in order)"
            )
        if have + size > sizes[blob.part]:
            raise InvalidArgument.field(
                blob.key, f"part {blob.part!r}: {have + size} bytes sent, {sizes[blob.part]} declared"
            )
        pending.chunks[blob.part].append(blob.data)
        pending.received[blob.part] = have + size
        self.received_bytes += size

    def finish(self) -> tuple[dict[str, Encoded], dict[str, int]]:
        """The tensors (key -> Encoded) and their header versions, once every part is complete."""
        tensors: dict[str, Encoded] = {}
        versions: dict[str, int] = {}
        for key, pending in self._tensors.items():
            header = pending.header
            for part, size in header.part_bytes.items():
                if pending.received[part] != size:
                    raise InvalidArgument.field(
                        key, f"part {part!r}: {pending.received[part]} of {size} declared bytes arrived"
                    )
            meta: dict[str, float | int] = dict(header.meta)
            payload = {part: b"".join(chunks) for part, chunks in pending.chunks.items()}
            tensors[key] = Encoded(header.codec, tuple(header.shape), payload, meta)
            versions[key] = header.version
        return tensors, versions


def plan_for_job(config: pb.ShardConfig) -> ShardPlan:
    """The plan every shard of the job computes (compare :meth:`ShardPlan.fingerprint` with InitShard's).

    Raises:
        InvalidArgument: On a bad model spec, shard count or piece size.
    """
    try:
        arguments = json.loads(config.model.arguments_json or "{}")
        manifest = Manifest.for_model(config.model.architecture, arguments)
        model = build_model(manifest, "meta")
    except (ValueError, ArtifactError) as exc:
        raise InvalidArgument.field("config.model", str(exc)) from None
    return plan_for_state(model.state_dict(), config.num_shards, config.max_piece_elements)


@dataclass(frozen=True)
class PushResult:
    #: Payload bytes this client put on the wire.
    bytes_sent: int
    #: Payload bytes the shard counted.
    bytes_received: int
    #: The shard had this step from this worker already: nothing was applied.
    duplicate: bool


@dataclass(frozen=True)
class PullResult:
    incarnation: str
    #: Steps every worker has completed on the shard.
    step: int
    #: Piece key -> (version, flat float32 tensor) for the pieces whose version changed.
    tensors: dict[str, tuple[int, torch.Tensor]]
    #: Payload bytes received.
    bytes_received: int


class ParamServerClient:
    """One shard's client: domain errors instead of grpc errors, tensors in and out."""

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float = 30.0) -> None:
        self.channel = channel
        self.stub = paramserver_pb2_grpc.ParameterServerStub(channel)
        self.timeout_s = timeout_s

    @classmethod
    def connect(cls, target: str, settings: CommonSettings) -> ParamServerClient:
        return cls(make_channel(target, settings, [SERVICE]), settings.rpc_timeout_s)

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, method: str, request: object, timeout: float | None = None) -> Any:
        try:
            return await getattr(self.stub, method)(request, timeout=timeout or self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    async def init_shard(self, config: pb.ShardConfig, *, timeout: float | None = None) -> pb.InitShardResponse:
        """Gives the shard its job (idempotent); the answer says whether it restored a checkpoint."""
        response: pb.InitShardResponse = await self._call("InitShard", pb.InitShardRequest(config=config), timeout)
        return response

    async def push(
        self,
        job_id: str,
        worker: int,
        step: int,
        encoded: Mapping[str, Encoded],
        *,
        timeout: float | None = None,
    ) -> PushResult:
        """Streams one worker's encoded gradients (piece key -> Encoded) for ``step``."""
        header = pb.PushHeader(job_id=job_id, worker=worker, step=step)

        async def messages() -> AsyncIterator[pb.PushRequest]:
            yield pb.PushRequest(header=header)
            for message in frame_tensors(encoded):
                if isinstance(message, pb.TensorHeader):
                    yield pb.PushRequest(tensor=message)
                else:
                    yield pb.PushRequest(blob=message)

        try:
            response = await self.stub.Push(messages(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        sent = sum(e.nbytes for e in encoded.values())
        return PushResult(bytes_sent=sent, bytes_received=response.bytes_received, duplicate=response.duplicate)

    async def pull(
        self,
        job_id: str,
        worker: int,
        step: int,
        versions: Mapping[str, int],
        incarnation: str,
        wait_timeout_s: float = 0,
    ) -> PullResult:
        """Waits (on the shard) until ``worker`` may read for ``step``; returns the pieces it lacks.

        Args:
            versions: Piece key -> version held; pass what earlier pulls returned.
            incarnation: The incarnation those versions came from ("" on the first pull).
            wait_timeout_s: How long the shard may wait for slower workers (0: its default).

        Raises:
            DeadlineExceeded: If slower workers do not catch up in time; retry or replace them.
        """
        request = pb.PullRequest(
            job_id=job_id,
            worker=worker,
            step=step,
            versions=dict(versions),
            incarnation=incarnation,
            wait_timeout_s=wait_timeout_s,
        )
        # The shard enforces the wait; the deadline only adds room for the transfer.
        deadline = wait_timeout_s + self.timeout_s if wait_timeout_s > 0 else None
        header: pb.PullHeader | None = None
        assembler = TensorAssembler()
        try:
            async for message in self.stub.Pull(request, timeout=deadline):
                kind = message.WhichOneof("payload")
                if kind == "header":
                    header = message.header
                elif kind is not None:
                    assembler.add(getattr(message, kind))
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        try:
            if header is None or header.tensors != len(assembler):
                raise InvalidArgument("the header is missing or counts another number of tensors")
            encoded, got_versions = assembler.finish()
            tensors = {key: (got_versions[key], _flat(key, e)) for key, e in encoded.items()}
        except (InvalidArgument, EncodingError) as exc:
            raise Internal(f"malformed pull response from the shard: {exc}") from None
        return PullResult(
            incarnation=header.incarnation,
            step=header.step,
            tensors=tensors,
            bytes_received=assembler.received_bytes,
        )

    async def replace_worker(self, job_id: str, worker: int) -> int:
        """Re-admits ``worker`` (a fresh process for a dead one); returns the step it computes next."""
        response = await self._call("ReplaceWorker", pb.ReplaceWorkerRequest(job_id=job_id, worker=worker))
        return int(response.resume_step)

    async def checkpoint(self, job_id: str, *, timeout: float | None = None) -> pb.CheckpointResponse:
        """Has the shard write its checkpoint now; returns the step saved and the file."""
        response: pb.CheckpointResponse = await self._call("Checkpoint", pb.CheckpointRequest(job_id=job_id), timeout)
        return response

    async def status(self, job_id: str) -> pb.GetShardStatusResponse:
        response: pb.GetShardStatusResponse = await self._call(
            "GetShardStatus", pb.GetShardStatusRequest(job_id=job_id)
        )
        return response


def _flat(key: str, encoded: Encoded) -> torch.Tensor:
    if len(encoded.shape) != 1:
        raise InvalidArgument.field(key, f"pieces are flat, got shape {encoded.shape}")
    tensor = decode(encoded, expected_shape=(math.prod(encoded.shape),))
    return tensor
