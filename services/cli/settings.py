"""Settings of the command line: where the services are."""

from __future__ import annotations

from pydantic import Field

from shared.settings import CommonSettings


class CliSettings(CommonSettings):
    """The same ``MAAS_*`` variables the services read, so one environment drives both."""

    registry_address: str = Field("127.0.0.1:7001", description="host:port of the registry.")
    scheduler_address: str = Field("127.0.0.1:7002", description="host:port of the scheduler.")
    gateway_address: str = Field("127.0.0.1:8001", description="host:port of the gateway (KServe v2 gRPC).")
