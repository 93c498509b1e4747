"""``maas.paramserver.v1.ParameterServer``: each RPC converts, awaits the shard host, converts back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from maas.paramserver.v1 import paramserver_pb2 as pb
from maas.paramserver.v1 import paramserver_pb2_grpc

from services.paramserver.api import convert
from services.paramserver.core.host import ShardHost
from shared.clients.paramserver import TensorAssembler, frame_tensor
from shared.compression import get_codec
from shared.errors import InvalidArgument
from shared.security.access import Access, rules

# Pulls send parameters exactly: raw float32.
_PULL_CODEC = get_codec("none")


# A shard is the mesh's alone: the scheduler initialises it, the job's workers push and pull.
AUTHORIZATION = rules(
    pb.DESCRIPTOR.services_by_name["ParameterServer"],
    {m.name: Access.INTERNAL for m in pb.DESCRIPTOR.services_by_name["ParameterServer"].methods},
)


class ParamServerServicer(paramserver_pb2_grpc.ParameterServerServicer):
    def __init__(self, host: ShardHost) -> None:
        self._host = host

    async def InitShard(self, request: pb.InitShardRequest, context: grpc.aio.ServicerContext) -> pb.InitShardResponse:
        if not request.HasField("config"):
            raise InvalidArgument.field("config", "required")
        result = await self._host.init(convert.config_from_pb(request.config))
        return convert.init_to_pb(result)

    async def Push(
        self, request_iterator: AsyncIterator[pb.PushRequest], context: grpc.aio.ServicerContext
    ) -> pb.PushResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidArgument.field("header", "the first message of a push must carry the PushHeader")
        header = first.header
        # Refuse a push for another job before reading its tensors.
        assembler = TensorAssembler(limits=self._host.push_limits(header.job_id))
        async for message in request_iterator:
            kind = message.WhichOneof("payload")
            if kind == "header":
                raise InvalidArgument.field("header", "only the first message of a push may carry the PushHeader")
            if kind is None:
                raise InvalidArgument.field("payload", "empty PushRequest")
            assembler.add(getattr(message, kind))
        tensors, _ = assembler.finish()
        result = await self._host.push(header.job_id, header.worker, header.step, tensors)
        return pb.PushResponse(bytes_received=result.bytes_received, duplicate=result.duplicate)

    async def Pull(self, request: pb.PullRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.PullResponse]:
        result = await self._host.pull(
            request.job_id,
            request.worker,
            request.step,
            dict(request.versions),
            request.incarnation,
            request.wait_timeout_s,
        )
        yield pb.PullResponse(
            header=pb.PullHeader(incarnation=result.incarnation, step=result.step, tensors=len(result.tensors))
        )
        encoder = _PULL_CODEC.encoder()
        # One piece encoded at a time: a large shard never holds all its bytes twice.
        for key in sorted(result.tensors):
            version, tensor = result.tensors[key]
            for message in frame_tensor(key, encoder.encode(key, tensor), version=version):
                if isinstance(message, pb.TensorHeader):
                    yield pb.PullResponse(tensor=message)
                else:
                    yield pb.PullResponse(blob=message)

    async def ReplaceWorker(
        self, request: pb.ReplaceWorkerRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReplaceWorkerResponse:
        return pb.ReplaceWorkerResponse(resume_step=await self._host.replace_worker(request.job_id, request.worker))

    async def Checkpoint(
        self, request: pb.CheckpointRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckpointResponse:
        result = await self._host.checkpoint(request.job_id)
        return pb.CheckpointResponse(step=result.step, path=result.path)

    async def GetShardStatus(
        self, request: pb.GetShardStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetShardStatusResponse:
        return convert.status_to_pb(await self._host.status(request.job_id))
