"""Conversions between parameter-server protos and the core's types.

Tensor framing (TensorHeader and Blobs <-> Encoded) lives in ``shared.clients.paramserver``, shared
with the client; this module covers the rest.
"""

from __future__ import annotations

import json
from typing import Any

from maas.paramserver.v1 import paramserver_pb2 as pb

from services.paramserver.core.config import InitResult, ShardConfig, ShardStatus
from shared.errors import InvalidArgument


def _arguments(text: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        arguments = json.loads(text)
    except (ValueError, RecursionError) as exc:
        # ValueError also covers integers beyond Python's digit limit; RecursionError, deep nesting.
        raise InvalidArgument.field("config.model.arguments_json", f"is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(arguments, dict):
        raise InvalidArgument.field("config.model.arguments_json", "must be a JSON object")
    return arguments


def config_from_pb(config: pb.ShardConfig) -> ShardConfig:
    return ShardConfig(
        job_id=config.job_id,
        shard_index=config.shard_index,
        num_shards=config.num_shards,
        num_workers=config.num_workers,
        consistency=config.consistency,
        staleness=config.staleness,
        architecture=config.model.architecture,
        arguments=_arguments(config.model.arguments_json),
        seed=config.model.seed,
        optimizer=config.optimizer.name,
        hyperparameters=dict(config.optimizer.hyperparameters),
        schedule=config.optimizer.schedule,
        schedule_arguments=dict(config.optimizer.schedule_arguments),
        checkpoint_dir=config.checkpoint_dir,
        checkpoint_interval=config.checkpoint_interval,
        max_piece_elements=config.max_piece_elements,
    )


def init_to_pb(result: InitResult) -> pb.InitShardResponse:
    return pb.InitShardResponse(
        restored=result.restored,
        step=result.step,
        incarnation=result.incarnation,
        keys=result.keys,
        plan_fingerprint=result.plan_fingerprint,
    )


def status_to_pb(status: ShardStatus) -> pb.GetShardStatusResponse:
    return pb.GetShardStatusResponse(
        job_id=status.job_id,
        shard_index=status.shard_index,
        step=status.step,
        worker_clocks=status.worker_clocks,
        parameters=status.parameters,
        bytes_received=status.bytes_received,
        last_checkpoint_step=status.last_checkpoint_step,
        incarnation=status.incarnation,
    )
