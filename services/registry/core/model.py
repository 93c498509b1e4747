"""Domain types of the registry."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Lineage:
    """Where a version came from."""

    training_job_id: str = ""
    dataset_fingerprint: str = ""
    hyperparameters: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    parent_version: int = 0
    derivation: str = ""
    size_ratio: float = 0.0
    source: str = ""


@dataclass(frozen=True)
class Model:
    name: str
    # The tenant that owns the model (and its versions and aliases).
    tenant: str
    description: str
    tags: dict[str, str]
    latest_version: int
    aliases: dict[str, int]
    create_time: datetime
    update_time: datetime


@dataclass(frozen=True)
class VersionSignature:
    """An OpenSSF Model Signing bundle over a version's bytes, checked when it was added."""

    key_id: str
    sha256: str
    bundle: bytes
    public_key_pem: bytes
    create_time: datetime


@dataclass(frozen=True)
class TrustedKey:
    """A public key whose signatures a tenant's deployments accept."""

    tenant: str
    name: str
    key_id: str
    public_key_pem: bytes
    create_time: datetime


@dataclass(frozen=True)
class Version:
    model: str
    number: int
    sha256: str
    size_bytes: int
    manifest_json: str
    tags: dict[str, str]
    lineage: Lineage
    aliases: tuple[str, ...]
    create_time: datetime
    signatures: tuple[VersionSignature, ...] = ()


@dataclass(frozen=True)
class Alias:
    model: str
    name: str
    version: int
    update_time: datetime


class EventType(enum.StrEnum):
    MODEL_CREATED = "MODEL_CREATED"
    MODEL_UPDATED = "MODEL_UPDATED"
    MODEL_DELETED = "MODEL_DELETED"
    VERSION_CREATED = "VERSION_CREATED"
    ALIAS_SET = "ALIAS_SET"
    ALIAS_DELETED = "ALIAS_DELETED"


@dataclass(frozen=True)
class Event:
    sequence: int
    type: EventType
    model: str
    version: int
    alias: str
    time: datetime


@dataclass(frozen=True)
class NewVersion:
    """Everything about a version but its number, which the repository allocates."""

    model: str
    sha256: str
    size_bytes: int
    manifest_json: str
    architecture: str
    framework: str
    dtype: str
    tags: dict[str, str]
    lineage: Lineage


@dataclass(frozen=True)
class UploadRequest:
    """The first message of an upload: what the bytes that follow must be."""

    model: str
    manifest_json: str
    sha256: str
    size_bytes: int
    tags: dict[str, str] = field(default_factory=dict)
    lineage: Lineage = field(default_factory=Lineage)
    create_model: bool = False


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_page_token: str = ""
