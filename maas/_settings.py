"""Where the mesh is and how to prove who you are: the same settings and credentials file as the CLI."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from shared.settings import CommonSettings


def credentials_path(home: Path) -> Path:
    """The credentials file ``maas up`` writes under ``MAAS_HOME`` (0600): the local admin key and the CA."""
    return home / "credentials.json"


def read_credentials(home: Path) -> dict[str, Any]:
    """The credentials file under ``home`` (``{}`` when there is none or it is unreadable)."""
    try:
        data = json.loads(credentials_path(home).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class Credentials:
    """How a client authenticates, when not from the environment and ``MAAS_HOME/credentials.json``.

    Attributes:
        api_key: The API key (sent as a bearer token).
        ca_file: The CA that signed the servers' certificates (TLS); None: the system's roots, or the file's.
        insecure: True for a plaintext development mesh (``maas up --insecure``); None: as configured.
    """

    api_key: str | None = None
    ca_file: Path | None = None
    insecure: bool | None = None


class ClientSettings(CommonSettings):
    """Where the services are, from the same ``MAAS_*`` variables the services and the CLI read.

    What the environment and the config file leave unset comes from ``MAAS_HOME/credentials.json`` (written
    by ``maas up``): the API key, the CA, and whether the mesh runs plaintext.
    """

    registry_address: str = Field("127.0.0.1:7001", description="host:port of the registry.")
    scheduler_address: str = Field("127.0.0.1:7002", description="host:port of the scheduler.")
    gateway_address: str = Field("127.0.0.1:8001", description="host:port of the gateway (KServe v2 gRPC).")

    @model_validator(mode="after")
    def _credentials_file(self) -> ClientSettings:
        data = read_credentials(self.home)
        if "client_token" not in self.model_fields_set and isinstance(data.get("api_key"), str) and data["api_key"]:
            self.client_token = data["api_key"]
        if "tls_ca_file" not in self.model_fields_set and isinstance(data.get("ca_file"), str):
            self.tls_ca_file = Path(data["ca_file"])
        if "insecure" not in self.model_fields_set and isinstance(data.get("insecure"), bool):
            self.insecure = data["insecure"]
        return self


def _with_host(address: str, host: str) -> str:
    _, sep, port = address.rpartition(":")
    return f"{host}:{port}" if sep else host


def resolve_settings(
    settings: ClientSettings | None,
    address: str | None,
    credentials: str | Credentials | None,
    overrides: dict[str, str | None],
) -> ClientSettings:
    """The settings a client uses: ``settings`` (default: built from the environment) with the arguments the
    caller gave applied on top."""
    settings = settings if settings is not None else ClientSettings()
    changes: dict[str, Any] = {}
    if address is not None:
        if ":" in address:
            raise ValueError(f"address is a host (each service keeps its port); got {address!r}")
        for field in ("registry_address", "scheduler_address", "gateway_address"):
            changes[field] = _with_host(getattr(settings, field), address)
    changes.update({field: value for field, value in overrides.items() if value is not None})
    if isinstance(credentials, str):
        changes["client_token"] = credentials
    elif credentials is not None:
        if credentials.api_key is not None:
            changes["client_token"] = credentials.api_key
        if credentials.ca_file is not None:
            changes["tls_ca_file"] = credentials.ca_file
        if credentials.insecure is not None:
            changes["insecure"] = credentials.insecure
    return settings.model_copy(update=changes) if changes else settings
