"""The settings every Ray actor of the mesh gets from the scheduler, as ``MAAS_*`` environment variables.

Replicas, parameter-server shards and training ranks serve gRPC and call other services, so each needs
the mesh's transport security and identity exactly as the scheduler has them: on a cluster the actors start
on other nodes with an empty environment, and nothing else would bring these there. They also build models
from the zoo, under the same size cap the scheduler validated the job against, and export their spans where
the scheduler's go.
"""

from __future__ import annotations

import json

from shared.settings import CommonSettings

#: Transport and identity: TLS files, the server name clients verify, the internal token, the key file.
PASSED_SETTINGS = (
    "insecure",
    "tls_cert_file",
    "tls_key_file",
    "tls_ca_file",
    "tls_server_name",
    "auth_keys_file",
    "internal_token",
    "client_token",
    # The zoo's size cap: a job the scheduler admitted must not be refused by its own ranks and shards.
    "zoo_max_elements",
    # Where spans go: a job's or a request's trace continues in the actors and must reach the same place.
    "otel_exporter",
    "otel_endpoint",
)


def actor_env(settings: CommonSettings) -> dict[str, str]:
    """``MAAS_*`` variables for an actor: the settings above, and mutual TLS on its own server (only the
    mesh's services, holding certificates from its CA, call an actor)."""
    env: dict[str, str] = {"MAAS_TLS_REQUIRE_CLIENT_CERT": "true"}
    for name in PASSED_SETTINGS:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, bool):
            value = str(value).lower()
        elif name.endswith("_file"):
            # Absolute, not resolved: a mounted Kubernetes Secret is a symlink into a timestamped directory
            # that exists on this pod only (the actors mount the same Secret at the same path).
            value = str(value.absolute())
        env[f"MAAS_{name.upper()}"] = json.dumps(value) if isinstance(value, dict) else str(value)
    return env
