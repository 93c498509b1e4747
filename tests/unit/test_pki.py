"""The mesh PKI: files and modes, certificate contents, idempotence, and real mutual-TLS handshakes."""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from shared.security.pki import MESH_NAME, CertPaths, MeshPki, default_hosts, identity_of, init_pki


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _snapshot(pki: MeshPki) -> dict[str, bytes]:
    paths = [pki.ca.cert, pki.ca.key, *(p for c in pki.services.values() for p in (c.cert, c.key))]
    return {p.name: p.read_bytes() for p in paths}


def test_init_writes_files_with_modes(tmp_path: Path) -> None:
    pki = init_pki(tmp_path / "tls", ["registry", "gateway"])
    assert pki.directory == tmp_path / "tls"
    assert _mode(pki.directory) == 0o700
    assert pki.ca == CertPaths(pki.directory / "ca.pem", pki.directory / "ca-key.pem")
    assert sorted(pki.services) == ["gateway", "registry"]
    for paths in [pki.ca, *pki.services.values()]:
        assert _mode(paths.key) == 0o600
        assert _mode(paths.cert) == 0o644
        assert b"BEGIN PRIVATE KEY" in paths.key.read_bytes()
        assert paths.cert.read_bytes().count(b"BEGIN CERTIFICATE") == 1
    assert not list(pki.directory.glob("*.tmp")) and not list(pki.directory.glob(".*"))


def test_service_certificate_contents(tmp_path: Path) -> None:
    pki = init_pki(tmp_path, ["registry"], hosts=["node-1.example", "10.1.2.3", "10.1.2.3", "LOCALHOST"])
    ca, cert = _cert(pki.ca.cert), _cert(pki.services["registry"].cert)
    cert.verify_directly_issued_by(ca)

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = san.get_values_for_type(x509.DNSName)
    assert dns == ["localhost", "registry.maas.internal", MESH_NAME, "node-1.example"]
    ips = san.get_values_for_type(x509.IPAddress)
    assert ips == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"), ipaddress.ip_address("10.1.2.3")]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://maas.internal/service/registry"]

    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "registry"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "maas mesh"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and not basic.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 825 * 86400 <= lifetime.total_seconds() <= 825 * 86400 + 600

    ca_basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ca_basic.critical and ca_basic.value.ca and ca_basic.value.path_length == 0
    ca_usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ca_usage.critical and ca_usage.value.key_cert_sign and ca_usage.value.crl_sign
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "maas development CA"

    assert identity_of(pki.services["registry"].cert.read_bytes()) == "registry"
    assert identity_of(pki.ca.cert.read_bytes()) is None


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_modes_do_not_depend_on_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        pki = init_pki(tmp_path / "tls", ["registry"])
    finally:
        os.umask(previous)
    assert _mode(pki.directory) == 0o700
    assert _mode(pki.ca.key) == _mode(pki.services["registry"].key) == 0o600
    assert _mode(pki.ca.cert) == _mode(pki.services["registry"].cert) == 0o644


@pytest.mark.parametrize("name", ["", "Registry", "../etc", "a/b", "-x", "x" * 64, "a b", ".hidden"])
def test_bad_service_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="invalid service name"):
        init_pki(tmp_path / "tls", ["ok", name])
    assert not (tmp_path / "tls").exists()


def test_idempotent(tmp_path: Path) -> None:
    pki = init_pki(tmp_path, ["registry", "gateway"])
    before = _snapshot(pki)
    assert _snapshot(init_pki(tmp_path, ["registry", "gateway"])) == before


def test_new_host_reissues_certificates_but_keeps_ca(tmp_path: Path) -> None:
    before = _snapshot(init_pki(tmp_path, ["registry"]))
    pki = init_pki(tmp_path, ["registry"], hosts=["10.9.9.9"])
    after = _snapshot(pki)
    assert after["ca.pem"] == before["ca.pem"] and after["ca-key.pem"] == before["ca-key.pem"]
    assert after["registry.pem"] != before["registry.pem"]
    cert = _cert(pki.services["registry"].cert)
    cert.verify_directly_issued_by(_cert(pki.ca.cert))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.9.9.9") in san.get_values_for_type(x509.IPAddress)
    # The host is now covered: asking again (or asking for fewer hosts) changes nothing.
    assert _snapshot(init_pki(tmp_path, ["registry"], hosts=["10.9.9.9"])) == after
    assert _snapshot(init_pki(tmp_path, ["registry"])) == after


def test_missing_or_foreign_service_certificate_is_reissued_alone(tmp_path: Path) -> None:
    before = _snapshot(init_pki(tmp_path / "a", ["registry", "gateway"]))
    (tmp_path / "a" / "registry.pem").unlink()
    after = _snapshot(init_pki(tmp_path / "a", ["registry", "gateway"]))
    assert after["registry.pem"] != before["registry.pem"]
    for name in ("ca.pem", "ca-key.pem", "gateway.pem", "gateway-key.pem"):
        assert after[name] == before[name]

    # A certificate and key from another CA are replaced by ones from this CA.
    other = init_pki(tmp_path / "b", ["gateway"])
    for source in (other.services["gateway"].cert, other.services["gateway"].key):
        (tmp_path / "a" / source.name).write_bytes(source.read_bytes())
    pki = init_pki(tmp_path / "a", ["registry", "gateway"])
    _cert(pki.services["gateway"].cert).verify_directly_issued_by(_cert(pki.ca.cert))
    assert _snapshot(pki)["registry.pem"] == after["registry.pem"]


def test_expiring_material_is_renewed(tmp_path: Path) -> None:
    before = _snapshot(init_pki(tmp_path, ["registry"]))
    # A service certificate within the renewal window is re-issued by the same CA.
    leaf_renewed = _snapshot(init_pki(tmp_path, ["registry"], renew_within_days=900))
    assert leaf_renewed["ca.pem"] == before["ca.pem"]
    assert leaf_renewed["registry.pem"] != before["registry.pem"]
    # An expiring CA is replaced, and every service certificate with it.
    pki = init_pki(tmp_path, ["registry"], renew_within_days=5000)
    ca_renewed = _snapshot(pki)
    assert ca_renewed["ca.pem"] != before["ca.pem"]
    assert ca_renewed["registry.pem"] != leaf_renewed["registry.pem"]
    _cert(pki.services["registry"].cert).verify_directly_issued_by(_cert(pki.ca.cert))


def test_identity_of_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        identity_of(b"not a certificate")


def test_default_hosts() -> None:
    hosts = default_hosts()
    assert hosts and all(hosts)
    assert len(set(hosts)) == len(hosts)
    assert not any(h.startswith("127.") for h in hosts)


async def _check(port: int, credentials: grpc.ChannelCredentials, options: list[tuple[str, str]]) -> int:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return int(response.status)


def _client(pki: MeshPki, ca: MeshPki, service: str | None) -> grpc.ChannelCredentials:
    root = ca.ca.cert.read_bytes()
    if service is None:
        return grpc.ssl_channel_credentials(root_certificates=root)
    paths = pki.services[service]
    return grpc.ssl_channel_credentials(root, paths.key.read_bytes(), paths.cert.read_bytes())


async def test_mutual_tls_handshake(tmp_path: Path) -> None:
    pki = init_pki(tmp_path / "mesh", ["registry", "gateway"])
    foreign = init_pki(tmp_path / "foreign", ["gateway"])
    server_paths = pki.services["registry"]
    credentials = grpc.ssl_server_credentials(
        [(server_paths.key.read_bytes(), server_paths.cert.read_bytes())],
        root_certificates=pki.ca.cert.read_bytes(),
        require_client_auth=True,
    )
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        serving = health_pb2.HealthCheckResponse.SERVING
        mesh = _client(pki, pki, "gateway")
        assert await _check(port, mesh, []) == serving
        assert await _check(port, mesh, [("grpc.ssl_target_name_override", MESH_NAME)]) == serving

        # No client certificate, or one from another CA (trusting ours or its own): refused.
        for refused in (
            _client(pki, pki, None),
            _client(foreign, pki, "gateway"),
            _client(foreign, foreign, "gateway"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await _check(port, refused, [])
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)
