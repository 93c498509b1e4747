"""Conversions between the KServe v2 messages and the gateway's domain types."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from inference import grpc_service_pb2 as kpb

from services.gateway.core.model import IndexEntry, LoadOptions
from services.gateway.core.statistics import Duration, VersionStats
from shared.errors import InvalidArgument, MaasError
from shared.grpc.status import STREAM_ERROR_CODE, STREAM_ERROR_REASON, status_code_for

_INT_PARAMETERS = ("min_replicas", "max_replicas", "max_batch_size", "max_queue_delay_us")
LOAD_PARAMETERS = ("version", *_INT_PARAMETERS)


def _ascii_digits(text: str) -> bool:
    # Only ASCII digits, and no more than int64 holds (str.isdigit takes any script's digits).
    return text.isascii() and text.isdigit() and len(text) <= 18


def _int_parameter(key: str, parameter: kpb.ModelRepositoryParameter) -> int:
    choice = parameter.WhichOneof("parameter_choice")
    if choice == "int64_param":
        value = parameter.int64_param
    elif choice == "string_param" and _ascii_digits(text := parameter.string_param.strip()):
        value = int(text)
    else:
        raise InvalidArgument.field(f"parameters.{key}", "must be a non-negative integer (int64 or digits)")
    if value < 0:
        raise InvalidArgument.field(f"parameters.{key}", f"must be >= 0, got {value}")
    return value


def load_options(request: kpb.RepositoryModelLoadRequest) -> LoadOptions:
    """RepositoryModelLoad's model name and parameters as load options.

    Raises:
        InvalidArgument: An unknown parameter, or a value of the wrong kind.
    """
    if not request.model_name:
        raise InvalidArgument.field("model_name", "is required")
    parameters: Mapping[str, kpb.ModelRepositoryParameter] = request.parameters
    unknown = sorted(set(parameters) - set(LOAD_PARAMETERS))
    if unknown:
        raise InvalidArgument.field("parameters", f"unknown {', '.join(unknown)} (known: {', '.join(LOAD_PARAMETERS)})")
    version: str | None = None
    if "version" in parameters:
        parameter = parameters["version"]
        choice = parameter.WhichOneof("parameter_choice")
        if choice == "string_param":
            version = parameter.string_param
        elif choice == "int64_param" and parameter.int64_param > 0:
            version = str(parameter.int64_param)
        else:
            raise InvalidArgument.field("parameters.version", "must be a version number or an alias")
    ints = {key: _int_parameter(key, parameters[key]) for key in _INT_PARAMETERS if key in parameters}
    return LoadOptions(name=request.model_name, version=version, **ints)


def index_to_pb(entries: Iterable[IndexEntry]) -> kpb.RepositoryIndexResponse:
    return kpb.RepositoryIndexResponse(
        models=[
            kpb.RepositoryIndexResponse.ModelIndex(name=e.name, version=e.version, state=e.state, reason=e.reason)
            for e in entries
        ]
    )


def _duration(value: Duration) -> kpb.StatisticDuration:
    return kpb.StatisticDuration(count=value.count, ns=value.ns)


def stats_to_pb(stats: Iterable[VersionStats]) -> kpb.ModelStatisticsResponse:
    return kpb.ModelStatisticsResponse(
        model_stats=[
            kpb.ModelStatistics(
                name=s.name,
                version=s.version,
                last_inference=s.last_inference,
                inference_count=s.inference_count,
                execution_count=s.execution_count,
                inference_stats=kpb.InferStatistics(
                    success=_duration(s.success),
                    fail=_duration(s.fail),
                    queue=_duration(s.queue),
                    compute_input=_duration(s.compute_input),
                    compute_infer=_duration(s.compute_infer),
                    compute_output=_duration(s.compute_output),
                ),
                batch_stats=[
                    kpb.InferBatchStatistics(
                        batch_size=b.batch_size,
                        compute_input=_duration(b.compute_input),
                        compute_infer=_duration(b.compute_infer),
                        compute_output=_duration(b.compute_output),
                    )
                    for _, b in sorted(s.batch_stats.items())
                ],
            )
            for s in stats
        ]
    )


def stream_error(request: kpb.ModelInferRequest | None, error: MaasError) -> bytes:
    """A ModelStreamInferResponse carrying ``error`` (Triton's convention: the stream goes on), with its
    status code and reason as parameters, so that clients can raise the typed error, not just show text."""
    response = kpb.ModelStreamInferResponse(error_message=error.message)
    response.infer_response.parameters[STREAM_ERROR_CODE].string_param = status_code_for(error).name
    response.infer_response.parameters[STREAM_ERROR_REASON].string_param = error.reason
    if request is not None:
        response.infer_response.model_name = request.model_name
        response.infer_response.model_version = request.model_version
        response.infer_response.id = request.id
    return response.SerializeToString()
