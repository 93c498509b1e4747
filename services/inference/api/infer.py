"""One ModelInfer request through the worker, whichever RPC carried it (ModelInfer or an InferStream entry)."""

from __future__ import annotations

from inference import grpc_service_pb2 as kpb

from services.inference.api import convert
from services.inference.core.host import ModelHost
from shared.kserve.codec import decode_inputs, encode_response, validate_request


async def infer_one(
    host: ModelHost, request: kpb.ModelInferRequest, pinned: int | None, time_remaining: float | None
) -> kpb.ModelInferResponse:
    """One ModelInfer request: resolve the version, validate, decode, run through the batcher, encode."""
    served = host.resolve(request.model_name, request.model_version, pinned)
    batch = validate_request(request, served.signature, served.batching.max_batch_size)
    priority, timeout_s = convert.scheduling(request, served.batching.default_timeout_us, time_remaining)
    inputs = decode_inputs(request)
    outputs = await host.infer(served, inputs, batch, priority=priority, timeout_s=timeout_s)
    return encode_response(request, str(served.version), outputs)
