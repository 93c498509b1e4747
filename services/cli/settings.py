"""Settings of the command line: where the services are (the SDK's settings) and what `maas up` adds."""

from __future__ import annotations

from maas import ClientSettings
from pydantic import Field


class CliSettings(ClientSettings):
    """The same ``MAAS_*`` variables the services read, so one environment drives both; what they leave unset
    comes from the credentials file ``maas up`` writes (see :class:`maas.ClientSettings`)."""

    registry_internal_address: str = Field(
        "127.0.0.1:7011", description="`maas up`: the registry's mutual-TLS listener, where the mesh's services call."
    )
    scheduler_internal_address: str = Field(
        "127.0.0.1:7012", description="`maas up`: the scheduler's mutual-TLS listener, where the gateway calls."
    )
