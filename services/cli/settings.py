"""Settings of the command line: where the services are."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from services.cli.credentials import read_credentials
from shared.settings import CommonSettings


class CliSettings(CommonSettings):
    """The same ``MAAS_*`` variables the services read, so one environment drives both."""

    registry_address: str = Field("127.0.0.1:7001", description="host:port of the registry.")
    scheduler_address: str = Field("127.0.0.1:7002", description="host:port of the scheduler.")
    gateway_address: str = Field("127.0.0.1:8001", description="host:port of the gateway (KServe v2 gRPC).")
    registry_internal_address: str = Field(
        "127.0.0.1:7011", description="`maas up`: the registry's mutual-TLS listener, where the mesh's services call."
    )
    scheduler_internal_address: str = Field(
        "127.0.0.1:7012", description="`maas up`: the scheduler's mutual-TLS listener, where the gateway calls."
    )

    @model_validator(mode="after")
    def _credentials_file(self) -> CliSettings:
        # What `maas up` wrote under MAAS_HOME (the local admin key, the CA, plaintext or not) fills what the
        # environment and the config file leave unset: the commands work on a local mesh with no setup.
        data = read_credentials(self.home)
        if "client_token" not in self.model_fields_set and isinstance(data.get("api_key"), str) and data["api_key"]:
            self.client_token = data["api_key"]
        if "tls_ca_file" not in self.model_fields_set and isinstance(data.get("ca_file"), str):
            self.tls_ca_file = Path(data["ca_file"])
        if "insecure" not in self.model_fields_set and isinstance(data.get("insecure"), bool):
            self.insecure = data["insecure"]
        return self
