"""Typed settings common to every service.

Every field is documented and read from ``MAAS_<FIELD>`` environment variables or from the TOML file
named by ``MAAS_CONFIG_FILE`` (environment wins). Services subclass :class:`CommonSettings` with their own
fields and build the object once, in their composition root.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

MiB = 1024 * 1024


class CommonSettings(BaseSettings):
    """Settings every maas service has."""

    model_config = SettingsConfigDict(env_prefix="MAAS_", extra="ignore", validate_default=True)

    home: Path = Field(Path(".maas"), description="Directory holding every service's local data.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Minimum log level.")
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="json, console, or auto (console on a terminal, json otherwise)."
    )
    log_file: Path | None = Field(
        None,
        description="Write log lines (JSON) to this file instead of stderr, rotated at log_file_max_bytes with 3 "
        "older files kept; `maas up` on a terminal sets MAAS_HOME/logs/<service>.log.",
    )
    log_file_max_bytes: int = Field(16 * MiB, ge=4096, description="Size at which log_file is rotated.")
    otel_exporter: Literal["none", "console", "otlp"] = Field(
        "none", description="Where OpenTelemetry spans go; trace ids are logged whatever this is."
    )
    otel_endpoint: str = Field("http://127.0.0.1:4317", description="OTLP gRPC endpoint when otel_exporter=otlp.")
    tls_cert_file: Path | None = Field(None, description="PEM server certificate; with tls_key_file enables TLS.")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_ca_file: Path | None = Field(
        None, description="PEM CA bundle: servers require client certificates signed by it; clients verify servers."
    )
    insecure: bool = Field(
        False,
        description="Development only: plaintext and no authentication (every server logs a warning). Off: TLS "
        "and API keys are required.",
    )
    tls_require_client_cert: bool = Field(
        True,
        description="With tls_ca_file, servers require client certificates signed by it (mutual TLS: the "
        "workers' and shards' servers); False: TLS only, callers authenticate with a token.",
    )
    tls_server_name: str | None = Field(
        None,
        description="The name clients verify in a server's certificate instead of the host they dial (the "
        "mesh's certificates carry mesh.maas.internal, valid on every node).",
    )
    reflection: bool = Field(
        True,
        description="Serve gRPC server reflection (grpcurl needs no .proto files); open to all, as health is. "
        "False hides the API's shape from unauthenticated callers.",
    )
    health_address: str | None = Field(
        None,
        description="host:port of a plaintext gRPC server with grpc.health.v1 only, for probes that cannot speak "
        "TLS (Kubernetes' gRPC probes); None: health is served on the main port only.",
    )
    auth_keys_file: Path | None = Field(
        None, description="The tenants' API keys (salted scrypt hashes); default MAAS_HOME/auth/keys.json."
    )
    internal_token: str | None = Field(
        None,
        description="Token the mesh's own services present to each other where no client certificate is asked "
        "(at least 32 characters); `maas up` needs none: its services use certificates.",
    )
    client_token: str | None = Field(None, description="Bearer token this process sends to other services.")
    max_streams_per_tenant: int | None = Field(
        256,
        ge=1,
        description="Streams (uploads, downloads, watches, generations) one tenant may hold open on a server at "
        "once; beyond it, RESOURCE_EXHAUSTED. None: no cap. The mesh's own services are never counted.",
    )
    rate_limit_inference: str | None = Field(
        "20000/second",
        description="Per tenant and server: inference calls allowed (e.g. '500/second'); over it, "
        "RESOURCE_EXHAUSTED with a retry delay. None: unlimited. The mesh's own services are never limited.",
    )
    rate_limit_management: str | None = Field(
        "100/second",
        description="Per tenant and server: calls that need a developer or admin key (e.g. '100/second').",
    )

    @field_validator("rate_limit_inference", "rate_limit_management")
    @classmethod
    def _rate_limit(cls, value: str | None) -> str | None:
        if value is not None:
            from shared.security.ratelimit import parse_limit

            parse_limit(value)
        return value

    max_message_bytes: int = Field(
        8 * MiB, ge=MiB, description="Largest gRPC message accepted or sent; large payloads are streamed."
    )
    max_concurrent_rpcs: int = Field(
        2000,
        ge=1,
        description="RPCs a server runs at once (streams included); beyond it, new calls get RESOURCE_EXHAUSTED "
        "instead of queueing without bound.",
    )
    zoo_max_elements: int = Field(
        2_000_000_000,
        ge=1,
        description="Largest model (total weights) this process builds from the zoo; bigger architectures are "
        "refused before any memory is allocated.",
    )
    shutdown_grace_s: float = Field(10.0, ge=0, description="Seconds in-flight RPCs get to finish on shutdown.")
    rpc_timeout_s: float = Field(30.0, gt=0, description="Default deadline of a unary call made by a client.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Read at build time, never at import time: the file is optional.
        config_file = os.environ.get("MAAS_CONFIG_FILE")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    @property
    def keys_path(self) -> Path:
        return self.auth_keys_file or self.home / "auth" / "keys.json"

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None and self.tls_key_file is not None


def settings_table(settings_cls: type[BaseSettings]) -> list[tuple[str, str, str]]:
    """(environment variable, default, description) for every field: the README's settings table."""
    prefix = settings_cls.model_config.get("env_prefix", "")
    rows = []
    for name, info in settings_cls.model_fields.items():
        default = info.get_default(call_default_factory=True)
        rows.append((f"{prefix}{name}".upper(), repr(default), info.description or ""))
    return rows
