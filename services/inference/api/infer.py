"""One ModelInfer request through the worker, whichever RPC carried it (ModelInfer or an InferStream entry)."""

from __future__ import annotations

from inference import grpc_service_pb2 as kpb
from maas.inference.v1 import worker_pb2 as wpb

from services.inference.api import convert
from services.inference.api.shm import SharedMemoryMaps, encode_shared_response, raw_inputs
from services.inference.core.host import ModelHost
from shared.kserve.codec import decode_inputs, encode_response, validate_request


async def infer_one(
    host: ModelHost,
    request: kpb.ModelInferRequest,
    pinned: int | None,
    time_remaining: float | None,
    shared_memory: tuple[wpb.SharedMemoryTensors, SharedMemoryMaps] | None = None,
) -> kpb.ModelInferResponse:
    """One ModelInfer request: resolve the version, validate, decode, run through the batcher, encode.

    ``shared_memory``: the windows (named by the gateway) the inputs are read from and outputs written to,
    and this worker's mappings.
    """
    served = host.resolve(request.model_name, request.model_version, pinned)
    raw = None if shared_memory is None else raw_inputs(request, shared_memory[0], shared_memory[1])
    batch = validate_request(request, served.signature, served.batching.max_batch_size, raw=raw)
    priority, timeout_s = convert.scheduling(request, served.batching.default_timeout_us, time_remaining)
    inputs = decode_inputs(request, raw=raw)
    outputs = await host.infer(served, inputs, batch, priority=priority, timeout_s=timeout_s)
    if shared_memory is None:
        return encode_response(request, str(served.version), outputs)
    tensors, maps = shared_memory
    return encode_shared_response(request, str(served.version), outputs, tensors.outputs, maps)
