"""The registry's settings (environment variables ``MAAS_REGISTRY_*`` plus the common ``MAAS_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator

from shared.names import ALIAS_NAME
from shared.settings import CommonSettings, MiB


class RegistrySettings(CommonSettings):
    """Settings of the registry service."""

    registry_address: str = Field("127.0.0.1:7001", description="host:port the registry's gRPC server binds.")
    registry_internal_address: str | None = Field(
        None,
        description="host:port of a second listener requiring client certificates from the mesh's CA (mutual "
        "TLS), where the mesh's services call; `maas up` sets 127.0.0.1:7011. None: no such listener.",
    )
    registry_metrics_address: str = Field(
        "127.0.0.1:9002", description="host:port of the Prometheus metrics endpoint (port 0 picks one)."
    )
    registry_database_url: str | None = Field(
        None,
        description="SQLAlchemy URL (sqlite:///... or postgresql+psycopg://...); default: SQLite under MAAS_HOME.",
    )
    registry_artifact_dir: Path | None = Field(
        None, description="Directory of the local artifact store; default: MAAS_HOME/registry/artifacts."
    )
    registry_artifact_url: str | None = Field(
        None,
        description="s3://bucket/prefix to keep artifacts in S3-compatible storage (credentials from the AWS "
        "environment); default: the local directory store.",
    )
    registry_s3_endpoint_url: str | None = Field(
        None, description="Endpoint of an S3-compatible service (MinIO, Ceph, ...); default: AWS."
    )
    registry_max_artifact_bytes: int = Field(
        16 * 1024 * MiB, gt=0, description="Largest artifact an upload may declare (bytes)."
    )
    registry_download_chunk_bytes: int = Field(
        1 * MiB, gt=0, le=4 * MiB, description="Bytes per message of a download stream."
    )
    registry_upload_idle_timeout_s: float = Field(
        60.0, gt=0, description="An upload that sends nothing for this long is ended (DEADLINE_EXCEEDED) and discarded."
    )
    registry_max_watchers: int = Field(
        256, ge=1, description="WatchEvents streams one registry serves at once; beyond it, RESOURCE_EXHAUSTED."
    )
    registry_watch_poll_s: float = Field(
        2.0, gt=0, description="How often watchers re-read the change feed for changes made by other replicas."
    )

    registry_encryption: bool = Field(
        True,
        description="Encrypt new artifacts at rest (AES-256-GCM in 1 MiB chunks under a per-artifact data key "
        "wrapped by the key-encryption key); artifacts stored before are still read.",
    )
    registry_kek: SecretStr | None = Field(
        None,
        description="The key-encryption key, base64 of 32 bytes (wins over MAAS_REGISTRY_KEK_FILE); keep it out "
        "of the artifact store's backups.",
    )
    registry_kek_file: Path | None = Field(
        None,
        description="File holding the key-encryption key (base64 of 32 bytes); default: "
        "MAAS_HOME/registry/kek.key, created (mode 0600) at the first start when missing.",
    )
    registry_protected_aliases: list[str] = Field(
        default_factory=lambda: ["production"],
        description="Aliases only an admin key, a key with the protected-aliases grant (in its tenant) or the "
        "mesh's services may set, move or delete; a developer gets PERMISSION_DENIED. A JSON list, e.g. "
        '\'["production", "stable"]\'.',
    )

    @field_validator("registry_protected_aliases")
    @classmethod
    def _valid_aliases(cls, value: list[str]) -> list[str]:
        # A typo here would protect nothing, silently: refuse to start instead.
        bad = [alias for alias in value if not ALIAS_NAME.fullmatch(alias)]
        if bad:
            raise ValueError(f"not valid alias names: {', '.join(map(repr, bad))}")
        return value

    def database_url(self) -> str:
        if self.registry_database_url:
            return self.registry_database_url
        return f"sqlite:///{(self.home / 'registry' / 'registry.db').resolve()}"

    def kek_file(self) -> Path:
        return self.registry_kek_file or self.home / "registry" / "kek.key"

    def artifact_dir(self) -> Path:
        return self.registry_artifact_dir or self.home / "registry" / "artifacts"
