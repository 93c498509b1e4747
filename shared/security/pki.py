"""The mesh's development PKI: one certificate authority and one certificate per service.

``maas up`` calls :func:`init_pki` on first start. Every gRPC server presents its service certificate, and
services call one another with mutual TLS, each side checking the other against the same CA. Running it
again is cheap and safe: valid material is kept, and only what is missing, foreign or expiring is issued.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.security.files import write_atomic

SERVICE_DOMAIN = "maas.internal"
# The one name every service certificate carries: internal clients verify it, whichever node they reach.
MESH_NAME = f"mesh.{SERVICE_DOMAIN}"
SPIFFE_PREFIX = f"spiffe://{SERVICE_DOMAIN}/service/"
CA_NAME = "maas development CA"
ORGANIZATION = "maas mesh"
CA_DAYS = 3650
_ORG = x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)
_SERVICE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
# Backdate validity so that a peer whose clock is slightly behind still accepts a fresh certificate.
_CLOCK_SKEW = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class CertPaths:
    """Where one certificate and its private key live."""

    cert: Path  # PEM certificate (the leaf only)
    key: Path  # PEM private key (PKCS8, unencrypted), mode 0600


@dataclass(frozen=True)
class MeshPki:
    """The CA and service certificates under one directory."""

    directory: Path
    ca: CertPaths
    services: dict[str, CertPaths]


def init_pki(
    directory: Path, services: Sequence[str], *, hosts: Sequence[str] = (), days: int = 825, renew_within_days: int = 30
) -> MeshPki:
    """Create (or complete) the CA and one certificate per service under `directory` (mode 0700).

    A valid CA is never replaced; a missing or expiring one is, and then every service certificate is re-issued.
    A service certificate is kept when the CA signed it, its key matches, it does not expire within
    `renew_within_days`, and its SANs cover `hosts` (IP strings become IP SANs, anything else DNS names).
    Raises ValueError for a service name outside ``^[a-z0-9][a-z0-9._-]{0,62}$``.
    """
    for service in services:
        # Names become file names: refuse anything that could escape the directory or look odd in a SAN.
        if not _SERVICE_RE.fullmatch(service):
            raise ValueError(f"invalid service name {service!r}: expected ^[a-z0-9][a-z0-9._-]{{0,62}}$")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)  # mkdir's mode is masked by umask and ignored for an existing directory
    now = datetime.datetime.now(datetime.UTC)
    renew_at = now + datetime.timedelta(days=renew_within_days)
    ca_paths = CertPaths(directory / "ca.pem", directory / "ca-key.pem")
    loaded = _load_pair(ca_paths)
    if loaded is None or loaded[0].not_valid_after_utc <= renew_at:
        loaded = _issue_ca(now)
        _save(ca_paths, *loaded)
    ca_cert, ca_key = loaded
    result: dict[str, CertPaths] = {}
    for service in dict.fromkeys(services):
        paths = CertPaths(directory / f"{service}.pem", directory / f"{service}-key.pem")
        sans = _service_sans(service, hosts)
        if not _still_good(paths, ca_cert, sans, renew_at):
            key = ec.generate_private_key(ec.SECP256R1())
            _save(paths, _issue_leaf(service, key, sans, ca_cert, ca_key, now, days), key)
        result[service] = paths
    return MeshPki(directory=directory, ca=ca_paths, services=result)


def default_hosts() -> list[str]:
    """This machine's hostname and primary non-loopback IPv4 address (when one is found without traffic)."""
    hosts = [socket.gethostname()]
    try:
        # connect() on a UDP socket only picks the outgoing interface; no packet is sent.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 1))
            address = str(probe.getsockname()[0])
        if not address.startswith("127.") and address != "0.0.0.0":
            hosts.append(address)
    except OSError:
        pass  # no route at all: the hostname alone has to do
    return [host for host in dict.fromkeys(hosts) if host]


def identity_of(cert_pem: bytes) -> str | None:
    """The service named by the certificate's ``spiffe://maas.internal/service/<name>`` URI SAN, else None.

    Raises ValueError when `cert_pem` is not a PEM certificate.
    """
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        name = uri.removeprefix(SPIFFE_PREFIX)
        if name != uri and _SERVICE_RE.fullmatch(name):
            return name
    return None


def _service_sans(service: str, hosts: Sequence[str]) -> list[x509.GeneralName]:
    names = ["localhost", f"{service}.{SERVICE_DOMAIN}", MESH_NAME, "127.0.0.1", "::1", *hosts]
    sans: dict[x509.GeneralName, None] = {}  # a dict keeps order and drops duplicates
    for name in (n.strip().lower() for n in names):
        if not name:
            continue
        try:
            sans[x509.IPAddress(ipaddress.ip_address(name))] = None
        except ValueError:
            sans[x509.DNSName(name)] = None
    sans[x509.UniformResourceIdentifier(SPIFFE_PREFIX + service)] = None
    return list(sans)


def _load_pair(paths: CertPaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The certificate and its key, or None when either is missing, unreadable or they do not match."""
    try:
        cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
        key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    # This module only ever writes EC keys; anything else was not made here.
    if not isinstance(key, ec.EllipticCurvePrivateKey) or cert.public_key() != key.public_key():
        return None
    return cert, key


def _still_good(
    paths: CertPaths, ca: x509.Certificate, sans: list[x509.GeneralName], renew_at: datetime.datetime
) -> bool:
    loaded = _load_pair(paths)
    if loaded is None or loaded[0].not_valid_after_utc <= renew_at:
        return False
    cert = loaded[0]
    try:
        cert.verify_directly_issued_by(ca)
        present = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):  # foreign or malformed: re-issue
        return False
    return present.issuperset(sans)


def _issue_ca(now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME), _ORG])
    usage = _key_usage(key_cert_sign=True, crl_sign=True)
    cert = (
        _builder(name, name, key.public_key(), now - _CLOCK_SKEW, now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _issue_leaf(
    service: str,
    key: ec.EllipticCurvePrivateKey,
    sans: list[x509.GeneralName],
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: datetime.datetime,
    days: int,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service), _ORG])
    # A leaf never outlives its CA: peers would reject it after the CA expires anyway.
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    # Both usages: every service is a server and, towards its peers, a mutual-TLS client.
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    return (
        _builder(subject, ca_cert.subject, key.public_key(), now - _CLOCK_SKEW, not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(eku, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _save(paths: CertPaths, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    # Key first: a crash in between leaves a mismatched pair, which the next run detects and re-issues.
    pkcs8 = serialization.PrivateFormat.PKCS8
    write_atomic(paths.key, key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption()), 0o600)
    write_atomic(paths.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
