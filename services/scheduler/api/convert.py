"""Conversions between scheduler protos and domain types."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp
from maas.common.v1 import common_pb2
from maas.paramserver.v1 import paramserver_pb2
from maas.scheduler.v1 import scheduler_pb2 as pb

from services.scheduler.core.jobs.model import (
    Job,
    JobState,
    OptimizerSpec,
    ResourceRequest,
    StepMetrics,
    TrainingJobSpec,
)
from shared.datasets import DatasetSpec
from shared.errors import InvalidArgument


def timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def _resources_from_pb(message: common_pb2.ResourceRequest) -> ResourceRequest:
    return ResourceRequest(cpus=message.cpus, gpus=message.gpus, memory_bytes=message.memory_bytes)


def _resources_to_pb(request: ResourceRequest) -> common_pb2.ResourceRequest:
    return common_pb2.ResourceRequest(cpus=request.cpus, gpus=request.gpus, memory_bytes=request.memory_bytes)


def spec_from_pb(message: pb.TrainingJobSpec) -> TrainingJobSpec:
    """The spec as sent (not yet validated nor defaulted)."""
    return TrainingJobSpec(
        architecture=message.architecture,
        arguments_json=message.arguments_json,
        dataset=DatasetSpec(
            name=message.dataset.name,
            options=dict(message.dataset.options),
            validation_fraction=message.dataset.validation_fraction,
        ),
        optimizer=OptimizerSpec(
            name=message.optimizer.name,
            hyperparameters=dict(message.optimizer.hyperparameters),
            schedule=message.optimizer.schedule,
            schedule_arguments=dict(message.optimizer.schedule_arguments),
        ),
        batch_size=message.batch_size,
        epochs=message.epochs,
        workers=message.workers,
        shards=message.shards,
        consistency=message.consistency,
        staleness=message.staleness,
        codec=message.codec,
        codec_options=dict(message.codec_options),
        checkpoint_interval=message.checkpoint_interval,
        priority=message.priority,
        priority_class=message.priority_class,
        tenant=message.tenant,
        target_model=message.target_model,
        worker_resources=_resources_from_pb(message.worker_resources),
        shard_resources=_resources_from_pb(message.shard_resources),
        seed=message.seed,
        max_failures=message.max_failures,
    )


def spec_to_pb(spec: TrainingJobSpec) -> pb.TrainingJobSpec:
    return pb.TrainingJobSpec(
        architecture=spec.architecture,
        arguments_json=spec.arguments_json,
        dataset=pb.DatasetSpec(
            name=spec.dataset.name,
            options={name: str(value) for name, value in spec.dataset.options.items()},
            validation_fraction=spec.dataset.validation_fraction,
        ),
        optimizer=paramserver_pb2.OptimizerSpec(
            name=spec.optimizer.name,
            hyperparameters=spec.optimizer.hyperparameters,
            schedule=spec.optimizer.schedule,
            schedule_arguments=spec.optimizer.schedule_arguments,
        ),
        batch_size=spec.batch_size,
        epochs=spec.epochs,
        workers=spec.workers,
        shards=spec.shards,
        consistency=spec.consistency,
        staleness=spec.staleness,
        codec=spec.codec,
        codec_options=spec.codec_options,
        checkpoint_interval=spec.checkpoint_interval,
        priority=spec.priority,
        priority_class=spec.priority_class,
        tenant=spec.tenant,
        target_model=spec.target_model,
        worker_resources=_resources_to_pb(spec.worker_resources),
        shard_resources=_resources_to_pb(spec.shard_resources),
        seed=spec.seed,
        max_failures=spec.max_failures,
    )


def state_to_pb(state: JobState) -> pb.JobState:
    return pb.JobState.Value(state.value)


def states_from_pb(values: list[int]) -> list[JobState]:
    states = []
    for value in values:
        if value == pb.JOB_STATE_UNSPECIFIED or value not in pb.JobState.values():
            raise InvalidArgument.field("states", f"{value} is not a job state")
        states.append(JobState(pb.JobState.Name(value)))
    return states


def job_to_pb(job: Job) -> pb.Job:
    return pb.Job(
        id=job.id,
        spec=spec_to_pb(job.spec),
        state=state_to_pb(job.state),
        message=job.message,
        queue_position=job.queue_position,
        step=job.step,
        total_steps=job.total_steps,
        metrics=job.metrics,
        model_version=job.model_version,
        dataset_fingerprint=job.dataset_fingerprint,
        failures=job.failures,
        preemptions=job.preemptions,
        create_time=timestamp(job.create_time),
        update_time=timestamp(job.update_time),
    )


def metrics_to_pb(metrics: StepMetrics) -> pb.StepMetrics:
    return pb.StepMetrics(
        worker=metrics.worker,
        step=metrics.step,
        loss=metrics.loss,
        samples_per_s=metrics.samples_per_s,
        bytes_sent=metrics.bytes_sent,
        bytes_received=metrics.bytes_received,
    )
