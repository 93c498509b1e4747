"""Conversions between the scheduler's deployment protos and domain types."""

from __future__ import annotations

from maas.inference.v1 import worker_pb2
from maas.scheduler.v1 import scheduler_pb2 as pb

from services.scheduler.api.convert import _resources_from_pb, _resources_to_pb, timestamp
from services.scheduler.core.deployments.model import (
    Autoscaling,
    Batching,
    Canary,
    Deployment,
    DeploymentEndpoints,
    DeploymentSpec,
    DeploymentState,
    ReplicaState,
)
from shared.kserve.convert import signature_to_pb

_STATES = {
    DeploymentState.DEPLOYING: pb.DEPLOYING,
    DeploymentState.READY: pb.DEPLOYMENT_READY,
    DeploymentState.UPDATING: pb.UPDATING,
    DeploymentState.DEGRADED: pb.DEGRADED,
    DeploymentState.FAILED: pb.DEPLOYMENT_FAILED,
    DeploymentState.DELETING: pb.DELETING,
}
_REPLICA_STATES = {
    ReplicaState.STARTING: pb.REPLICA_STARTING,
    ReplicaState.READY: pb.REPLICA_READY,
    ReplicaState.DRAINING: pb.REPLICA_DRAINING,
}


def batching_from_pb(message: worker_pb2.BatchingConfig) -> Batching:
    """As sent: 0 keeps meaning "the worker's default"."""
    return Batching(
        max_batch_size=message.max_batch_size,
        max_queue_delay_us=message.max_queue_delay_us,
        preferred_batch_sizes=tuple(message.preferred_batch_sizes),
        default_timeout_us=message.default_timeout_us,
        max_queue_size=message.max_queue_size,
    )


def batching_to_pb(batching: Batching) -> worker_pb2.BatchingConfig:
    return worker_pb2.BatchingConfig(
        max_batch_size=batching.max_batch_size,
        max_queue_delay_us=batching.max_queue_delay_us,
        preferred_batch_sizes=list(batching.preferred_batch_sizes),
        default_timeout_us=batching.default_timeout_us,
        max_queue_size=batching.max_queue_size,
    )


def deployment_spec_from_pb(message: pb.DeploymentSpec) -> DeploymentSpec:
    """The spec as sent (not yet validated nor defaulted)."""
    canary = None
    if message.HasField("canary"):
        canary = Canary(version=message.canary.version, weight_percent=message.canary.weight_percent)
    return DeploymentSpec(
        model=message.model,
        version=message.version,
        name=message.name,
        min_replicas=message.min_replicas,
        max_replicas=message.max_replicas,
        resources=_resources_from_pb(message.resources),
        batching=batching_from_pb(message.batching),
        autoscaling=Autoscaling(
            target_ongoing_requests=message.autoscaling.target_ongoing_requests,
            upscale_delay_s=message.autoscaling.upscale_delay_s,
            downscale_delay_s=message.autoscaling.downscale_delay_s,
        ),
        canary=canary,
        require_signature=message.require_signature,
    )


def deployment_spec_to_pb(spec: DeploymentSpec) -> pb.DeploymentSpec:
    message = pb.DeploymentSpec(
        model=spec.model,
        version=spec.version,
        name=spec.name,
        min_replicas=spec.min_replicas,
        max_replicas=spec.max_replicas,
        resources=_resources_to_pb(spec.resources),
        batching=batching_to_pb(spec.batching),
        autoscaling=pb.AutoscalingConfig(
            target_ongoing_requests=spec.autoscaling.target_ongoing_requests,
            upscale_delay_s=spec.autoscaling.upscale_delay_s,
            downscale_delay_s=spec.autoscaling.downscale_delay_s,
        ),
        require_signature=spec.require_signature,
    )
    if spec.canary is not None:
        message.canary.CopyFrom(pb.Canary(version=spec.canary.version, weight_percent=spec.canary.weight_percent))
    return message


def deployment_to_pb(deployment: Deployment) -> pb.Deployment:
    message = pb.Deployment(
        name=deployment.name,
        spec=deployment_spec_to_pb(deployment.spec),
        state=_STATES[deployment.state],
        message=deployment.message,
        version=deployment.version,
        canary_version=deployment.canary_version,
        target_replicas=deployment.target_replicas,
        replicas=[
            pb.Replica(id=r.id, version=r.version, address=r.address, state=_REPLICA_STATES[r.state])
            for r in deployment.replicas
        ],
        generation=deployment.generation,
        tenant=deployment.tenant,
    )
    if deployment.create_time is not None:
        message.create_time.CopyFrom(timestamp(deployment.create_time))
    if deployment.update_time is not None:
        message.update_time.CopyFrom(timestamp(deployment.update_time))
    return message


def endpoints_to_pb(item: DeploymentEndpoints) -> pb.DeploymentEndpoints:
    return pb.DeploymentEndpoints(
        name=item.name,
        state=_STATES[item.state],
        default_version=item.default_version,
        canary_version=item.canary_version,
        canary_weight_percent=item.canary_weight_percent,
        versions=[
            pb.ServedVersion(
                version=v.resolved.version,
                architecture=v.resolved.architecture,
                signature=signature_to_pb(v.resolved.signature),
                batching=batching_to_pb(v.batching),
                streaming=v.resolved.streaming,
                aliases=list(v.resolved.aliases),
            )
            for v in item.versions
        ],
        endpoints=[pb.Endpoint(replica_id=e.replica_id, address=e.address, version=e.version) for e in item.endpoints],
        target_replicas=item.target_replicas,
        max_replicas=item.max_replicas,
        tenant=item.tenant,
    )
