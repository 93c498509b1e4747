"""Conversions between registry protos and domain types."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp
from maas.common.v1 import common_pb2
from maas.registry.v1 import registry_pb2 as pb

from services.registry.core.model import Alias, Event, Lineage, Model, TrustedKey, UploadRequest, Version
from shared.artifacts import Manifest


def timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def model_to_pb(model: Model) -> pb.Model:
    return pb.Model(
        name=model.name,
        tenant=model.tenant,
        description=model.description,
        tags=model.tags,
        latest_version=model.latest_version,
        aliases=model.aliases,
        create_time=timestamp(model.create_time),
        update_time=timestamp(model.update_time),
    )


def lineage_to_pb(lineage: Lineage) -> pb.Lineage:
    return pb.Lineage(
        training_job_id=lineage.training_job_id,
        dataset_fingerprint=lineage.dataset_fingerprint,
        hyperparameters=lineage.hyperparameters,
        metrics=lineage.metrics,
        parent_version=lineage.parent_version,
        derivation=lineage.derivation,
        size_ratio=lineage.size_ratio,
        source=lineage.source,
    )


def lineage_from_pb(message: pb.Lineage) -> Lineage:
    return Lineage(
        training_job_id=message.training_job_id,
        dataset_fingerprint=message.dataset_fingerprint,
        hyperparameters=dict(message.hyperparameters),
        metrics=dict(message.metrics),
        parent_version=message.parent_version,
        derivation=message.derivation,
        size_ratio=message.size_ratio,
        source=message.source,
    )


def _spec(spec: object) -> common_pb2.TensorSpec:
    return common_pb2.TensorSpec(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))  # type: ignore[attr-defined]


def version_to_pb(version: Version) -> pb.Version:
    manifest = Manifest.from_json(version.manifest_json)
    return pb.Version(
        model=version.model,
        number=version.number,
        sha256=version.sha256,
        size_bytes=version.size_bytes,
        manifest_json=version.manifest_json,
        signature=common_pb2.Signature(
            inputs=[_spec(s) for s in manifest.signature.inputs],
            outputs=[_spec(s) for s in manifest.signature.outputs],
        ),
        architecture=manifest.architecture,
        framework=manifest.framework,
        dtype="int8" if manifest.quantization else manifest.dtype,
        tags=version.tags,
        lineage=lineage_to_pb(version.lineage),
        aliases=list(version.aliases),
        create_time=timestamp(version.create_time),
        signatures=[
            pb.VersionSignature(
                key_id=sig.key_id,
                sha256=sig.sha256,
                bundle=sig.bundle,
                public_key_pem=sig.public_key_pem.decode(),
                create_time=timestamp(sig.create_time),
            )
            for sig in version.signatures
        ],
    )


def trusted_key_to_pb(key: TrustedKey) -> pb.TrustedKey:
    return pb.TrustedKey(
        name=key.name,
        key_id=key.key_id,
        public_key_pem=key.public_key_pem.decode(),
        create_time=timestamp(key.create_time),
    )


def alias_to_pb(alias: Alias) -> pb.Alias:
    return pb.Alias(model=alias.model, name=alias.name, version=alias.version, update_time=timestamp(alias.update_time))


def event_to_pb(event: Event) -> pb.RegistryEvent:
    return pb.RegistryEvent(
        sequence=event.sequence,
        type=pb.RegistryEvent.Type.Value(event.type.value),
        model=event.model,
        version=event.version,
        alias=event.alias,
        time=timestamp(event.time),
    )


def upload_from_pb(meta: pb.UploadMetadata) -> UploadRequest:
    return UploadRequest(
        model=meta.model,
        manifest_json=meta.manifest_json,
        sha256=meta.sha256,
        size_bytes=meta.size_bytes,
        tags=dict(meta.tags),
        lineage=lineage_from_pb(meta.lineage),
        create_model=meta.create_model,
    )
