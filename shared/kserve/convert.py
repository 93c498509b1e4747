"""Conversions between domain types (signatures, batching settings) and their protobuf messages."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from inference import grpc_service_pb2, model_config_pb2
from maas.common.v1 import common_pb2
from maas.inference.v1 import worker_pb2

from shared.artifacts import Signature, TensorSpec
from shared.artifacts.errors import ArtifactError
from shared.errors import InvalidArgument
from shared.kserve.batching import BatchingSettings

__all__ = [
    "batching_from_pb",
    "batching_to_pb",
    "model_config_pb",
    "model_metadata_pb",
    "signature_from_pb",
    "signature_to_pb",
]

_CONFIG_TYPES: dict[str, model_config_pb2.DataType] = {
    "BOOL": model_config_pb2.TYPE_BOOL,
    "UINT8": model_config_pb2.TYPE_UINT8,
    "UINT16": model_config_pb2.TYPE_UINT16,
    "UINT32": model_config_pb2.TYPE_UINT32,
    "UINT64": model_config_pb2.TYPE_UINT64,
    "INT8": model_config_pb2.TYPE_INT8,
    "INT16": model_config_pb2.TYPE_INT16,
    "INT32": model_config_pb2.TYPE_INT32,
    "INT64": model_config_pb2.TYPE_INT64,
    "FP16": model_config_pb2.TYPE_FP16,
    "FP32": model_config_pb2.TYPE_FP32,
    "FP64": model_config_pb2.TYPE_FP64,
    "BYTES": model_config_pb2.TYPE_STRING,
    "BF16": model_config_pb2.TYPE_BF16,
}


def signature_from_pb(message: common_pb2.Signature) -> Signature:
    """Builds a domain signature from its message.

    Raises:
        InvalidArgument: If the message is not a valid signature (unknown datatype, bad dims, ...).
    """
    try:
        return Signature(
            inputs=tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in message.inputs),
            outputs=tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in message.outputs),
        )
    except ArtifactError as exc:
        raise InvalidArgument.field("signature", str(exc)) from None


def signature_to_pb(signature: Signature) -> common_pb2.Signature:
    """Returns the message form of a signature."""
    return common_pb2.Signature(
        inputs=[common_pb2.TensorSpec(name=t.name, datatype=t.datatype, shape=t.shape) for t in signature.inputs],
        outputs=[common_pb2.TensorSpec(name=t.name, datatype=t.datatype, shape=t.shape) for t in signature.outputs],
    )


def batching_from_pb(message: worker_pb2.BatchingConfig) -> BatchingSettings:
    """Resolves a ``BatchingConfig`` (0 fields take the documented defaults).

    Raises:
        InvalidArgument: If a field is out of range.
    """
    return BatchingSettings.resolve(
        max_batch_size=message.max_batch_size,
        max_queue_delay_us=message.max_queue_delay_us,
        preferred_batch_sizes=tuple(message.preferred_batch_sizes),
        default_timeout_us=message.default_timeout_us,
        max_queue_size=message.max_queue_size,
    )


def batching_to_pb(settings: BatchingSettings) -> worker_pb2.BatchingConfig:
    """Returns the message form of resolved batching settings (every field explicit)."""
    return worker_pb2.BatchingConfig(
        max_batch_size=settings.max_batch_size,
        max_queue_delay_us=settings.max_queue_delay_us,
        preferred_batch_sizes=settings.preferred_batch_sizes,
        default_timeout_us=settings.default_timeout_us,
        max_queue_size=settings.max_queue_size,
    )


def _dims(spec: TensorSpec) -> list[int]:
    return list(spec.shape[1:])


def model_config_pb(
    name: str,
    signature: Signature,
    batching: BatchingSettings,
    replicas: int,
    streaming: bool,
    platform: str = "pytorch",
) -> model_config_pb2.ModelConfig:
    """Builds Triton's ``ModelConfig`` for a served version.

    Dims leave out the batch dimension (the first of every signature shape), as Triton's do when
    ``max_batch_size`` > 0. Streaming models run one request at a time and report ``max_batch_size`` 1;
    ``dynamic_batching`` is filled only when batches larger than 1 can form.

    Args:
        name: The model name.
        signature: The version's signature (shapes with the batch dimension).
        batching: Its resolved batching settings.
        replicas: Replicas serving it (the instance group count).
        streaming: True for generative models (decoupled transaction policy).
        platform: The reported platform.
    """
    max_batch_size = 1 if streaming else batching.max_batch_size
    config = model_config_pb2.ModelConfig(
        name=name,
        platform=platform,
        backend=platform,
        max_batch_size=max_batch_size,
        input=[
            model_config_pb2.ModelInput(name=t.name, data_type=_CONFIG_TYPES[t.datatype], dims=_dims(t))
            for t in signature.inputs
        ],
        output=[
            model_config_pb2.ModelOutput(name=t.name, data_type=_CONFIG_TYPES[t.datatype], dims=_dims(t))
            for t in signature.outputs
        ],
        instance_group=[
            model_config_pb2.ModelInstanceGroup(count=replicas, kind=model_config_pb2.ModelInstanceGroup.KIND_AUTO)
        ],
        model_transaction_policy=model_config_pb2.ModelTransactionPolicy(decoupled=streaming),
    )
    if max_batch_size > 1:
        config.dynamic_batching.CopyFrom(
            model_config_pb2.ModelDynamicBatching(
                preferred_batch_size=batching.preferred_batch_sizes,
                max_queue_delay_microseconds=batching.max_queue_delay_us,
                default_queue_policy=model_config_pb2.ModelQueuePolicy(
                    timeout_action=model_config_pb2.ModelQueuePolicy.REJECT,
                    default_timeout_microseconds=batching.default_timeout_us,
                    allow_timeout_override=True,
                    max_queue_size=batching.max_queue_size,
                ),
            )
        )
    return config


def model_metadata_pb(
    name: str,
    versions: Sequence[str | int],
    signature: Signature,
    platform: str = "pytorch",
    provenance: Mapping[str, str] | None = None,
) -> grpc_service_pb2.ModelMetadataResponse:
    """Builds the ``ModelMetadataResponse`` of a model (full shapes, -1 for variable dims).

    ``provenance`` (see :func:`provenance`) goes to the response's ``parameters``, a maas extension.
    """
    tensor = grpc_service_pb2.ModelMetadataResponse.TensorMetadata
    response = grpc_service_pb2.ModelMetadataResponse(
        name=name,
        versions=[str(v) for v in versions],
        platform=platform,
        inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in signature.inputs],
        outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in signature.outputs],
    )
    for key, value in (provenance or {}).items():
        response.parameters[key].string_param = value
    return response


def provenance(sha256: str, signers: Sequence[str]) -> dict[str, str]:
    """ModelMetadata's ``parameters`` for a loaded version: its trusted signers and the digest they signed
    (empty when no trusted signature verified)."""
    return {"signers": ", ".join(signers), "sha256": sha256} if signers else {}


def provenance_from_pb(response: grpc_service_pb2.ModelMetadataResponse) -> dict[str, str]:
    return {key: value.string_param for key, value in response.parameters.items() if key in ("signers", "sha256")}
