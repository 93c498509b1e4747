"""Domain <-> protobuf conversions of the inference worker's RPCs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from inference import grpc_service_pb2 as kpb
from maas.inference.v1 import worker_pb2 as wpb

from services.inference.core.host import ServedVersion
from services.inference.core.stats import Duration, VersionStats
from shared.errors import InvalidArgument
from shared.kserve.codec import request_parameters
from shared.kserve.convert import batching_to_pb, signature_to_pb
from shared.kserve.metadata import VERSION_KEY
from shared.names import version_number

FINAL = "triton_final_response"


def loaded_to_pb(served: ServedVersion) -> wpb.LoadedModel:
    return wpb.LoadedModel(
        ref=wpb.ModelRef(model=served.model, version=served.version),
        architecture=served.architecture,
        signature=signature_to_pb(served.signature),
        batching=batching_to_pb(served.batching),
        streaming=served.streaming,
        memory_bytes=served.memory_bytes,
        device=served.device,
        ongoing=served.ongoing,
        sha256=served.sha256,
        signers=list(served.signers),
    )


def _duration(value: Duration) -> kpb.StatisticDuration:
    return kpb.StatisticDuration(count=value.count, ns=value.ns)


def stats_to_pb(model: str, version: int, stats: VersionStats) -> kpb.ModelStatistics:
    return kpb.ModelStatistics(
        name=model,
        version=str(version),
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=kpb.InferStatistics(
            success=_duration(stats.success),
            fail=_duration(stats.fail),
            queue=_duration(stats.queue),
            compute_input=_duration(stats.compute_input),
            compute_infer=_duration(stats.compute_infer),
            compute_output=_duration(stats.compute_output),
        ),
        batch_stats=[
            kpb.InferBatchStatistics(
                batch_size=size,
                compute_input=_duration(batch.compute_input),
                compute_infer=_duration(batch.compute_infer),
                compute_output=_duration(batch.compute_output),
            )
            for size, batch in sorted(stats.batches.items())
        ],
    )


def pinned_version(metadata: Sequence[tuple[str, str | bytes]] | None) -> int | None:
    """The ``maas-model-version`` the gateway chose, if any.

    Raises:
        InvalidArgument: If it is not a positive integer.
    """
    for key, value in metadata or ():
        if key == VERSION_KEY:
            text = value.decode() if isinstance(value, bytes) else value
            number = version_number(text, VERSION_KEY)
            if number is None:
                raise InvalidArgument(f"metadata {VERSION_KEY} must be a version number, got {text[:40]!r}")
            return number
    return None


def _int_param(params: dict[str, bool | int | float | str], name: str, default: int) -> int:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"parameter '{name}': must be a non-negative integer, got {value!r}")
    return value


def scheduling(
    request: kpb.ModelInferRequest, default_timeout_us: int, time_remaining: float | None
) -> tuple[int, float | None]:
    """The request's priority and queue timeout in seconds (its ``timeout`` parameter, else the version's
    default; never longer than the gRPC deadline leaves).

    Raises:
        InvalidArgument: If ``priority`` or ``timeout`` is not a non-negative integer.
    """
    params = request_parameters(request)
    priority = _int_param(params, "priority", 0)
    timeout_us = _int_param(params, "timeout", 0) or default_timeout_us
    timeout_s = timeout_us / 1e6 if timeout_us else None
    if time_remaining is not None:
        timeout_s = max(0.0, time_remaining) if timeout_s is None else min(timeout_s, max(0.0, time_remaining))
    return priority, timeout_s


def max_tokens(request: kpb.ModelInferRequest, default: int = 16) -> int:
    """The ``max_tokens`` parameter of a generation request (default 16).

    Raises:
        InvalidArgument: If it is not a positive integer.
    """
    value = request_parameters(request).get("max_tokens", default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"parameter 'max_tokens': must be an integer, got {value!r}")
    return value


def token_response(request: kpb.ModelInferRequest, version: int, token: int) -> kpb.ModelStreamInferResponse:
    response = kpb.ModelInferResponse(model_name=request.model_name, model_version=str(version), id=request.id)
    response.outputs.add(name="token_id", datatype="INT64", shape=[1, 1])
    response.raw_output_contents.append(np.array([token], dtype="<i8").tobytes())
    response.parameters[FINAL].bool_param = False
    return kpb.ModelStreamInferResponse(infer_response=response)


def final_response(request: kpb.ModelInferRequest, version: int) -> kpb.ModelStreamInferResponse:
    response = kpb.ModelInferResponse(model_name=request.model_name, model_version=str(version), id=request.id)
    response.parameters[FINAL].bool_param = True
    return kpb.ModelStreamInferResponse(infer_response=response)
