"""What ``maas up`` sets up under ``MAAS_HOME`` so that the mesh starts closed and the CLI still just works.

- ``tls/``: a development CA and one certificate per service (``shared.security.pki``): the services call each
  other with mutual TLS on their internal listeners, identified by these certificates;
- ``auth/keys.json``: the tenants' API keys, as salted scrypt hashes (``shared.security.keys``);
- ``credentials.json`` (0600): the local user's admin key and the CA, which the CLI reads; the key is
  printed once, when it is created.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from maas._settings import credentials_path, read_credentials

from shared.security.files import write_atomic
from shared.security.keys import KeyStore, Role
from shared.security.pki import MESH_NAME, CertPaths, default_hosts, init_pki

# The SDK reads the file (maas.ClientSettings); these names stay importable from here for the CLI's modules.
__all__ = ["MeshCredentials", "credentials_path", "ensure_mesh_credentials", "read_credentials"]
SERVICES = ("registry", "scheduler", "gateway")
DEFAULT_TENANT = "default"
ADMIN_KEY_NAME = "local-admin"


def write_private(path: Path, text: str) -> None:
    write_atomic(path, text.encode())


@dataclass(frozen=True)
class MeshCredentials:
    """Everything a secure local mesh needs, as files under ``MAAS_HOME``."""

    ca_file: Path
    certs: dict[str, CertPaths]
    keys_file: Path
    admin_key: str
    created_key: bool

    def service_env(self, service: str) -> dict[str, str]:
        """``MAAS_*`` variables of one service: its certificate (TLS for users, who authenticate with API keys;
        mutual TLS on the internal listeners, where the services call each other and their certificates are
        their identity), the name every service certificate carries, and the key file. No shared token: a
        service proves who it is with its certificate alone."""
        cert = self.certs[service]
        return {
            "MAAS_INSECURE": "false",
            "MAAS_TLS_CERT_FILE": str(cert.cert),
            "MAAS_TLS_KEY_FILE": str(cert.key),
            "MAAS_TLS_CA_FILE": str(self.ca_file),
            "MAAS_TLS_REQUIRE_CLIENT_CERT": "false",
            "MAAS_TLS_SERVER_NAME": MESH_NAME,
            "MAAS_AUTH_KEYS_FILE": str(self.keys_file),
        }


def init_certificates(home: Path) -> dict[str, CertPaths]:
    """``maas certs init``: the CA and the services' certificates (kept while valid)."""
    return init_pki(home / "tls", SERVICES, hosts=default_hosts()).services


def ensure_mesh_credentials(home: Path) -> MeshCredentials:
    """Create what is missing (certificates, an admin key) and return it all."""
    home = home.resolve()
    pki = init_pki(home / "tls", SERVICES, hosts=default_hosts())
    store = KeyStore(home / "auth" / "keys.json")
    saved = read_credentials(home).get("api_key")
    admin_key, created = (saved, False) if isinstance(saved, str) and store.verify(saved) else ("", True)
    if created:
        taken = {k.name for k in store.list(DEFAULT_TENANT, include_revoked=False)}
        name = next(n for n in (ADMIN_KEY_NAME, *(f"{ADMIN_KEY_NAME}-{i}" for i in range(2, 1000))) if n not in taken)
        _, admin_key = store.create(DEFAULT_TENANT, Role.ADMIN, name)
    write_private(
        credentials_path(home),
        json.dumps({"api_key": admin_key, "ca_file": str(pki.ca.cert), "insecure": False}, indent=2),
    )
    return MeshCredentials(
        ca_file=pki.ca.cert,
        certs=pki.services,
        keys_file=home / "auth" / "keys.json",
        admin_key=admin_key,
        created_key=created,
    )


def mark_insecure(home: Path) -> None:
    """Record that the mesh runs plaintext (``maas up --insecure``), keeping any key for the next secure run."""
    data = read_credentials(home)
    data["insecure"] = True
    write_private(credentials_path(home), json.dumps(data, indent=2))
