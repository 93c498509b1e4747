"""Signatures over artifacts in the OpenSSF Model Signing (OMS) format, with the ``model_signing`` package.

A signature is a Sigstore bundle whose DSSE envelope carries an in-toto statement listing each signed
file's digest. maas artifacts are one file, so a signature is good for a version when its statement lists
exactly one file whose sha256 is the version's: that holds both for a signature over the file itself
(``model_signing sign key model.safetensors``) and over a directory holding only it.

Signing uses ``model_signing``'s public API (elliptic-curve private keys work offline), with a bare key or
with a signing certificate and its chain (``model_signing sign certificate``). Verification uses its
verifiers on the bundle alone and compares the signed digest with the digest the caller already computed
from the bytes: the bytes are hashed once per load, not once more for the signature. That needs
``model_signing``'s verifier classes, which are not part of its documented API: the version is pinned.

A key signature is trusted through its public key; a certificate signature through a CA certificate its
signing certificate chains to (:func:`verify_with_ca`).

Pure (no grpc, no generated code).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shared.artifacts.errors import ArtifactError

__all__ = [
    "MAX_SIGNATURE_BYTES",
    "SignatureError",
    "SignedDigest",
    "anchor_id",
    "ca_certificates_pem",
    "certificate_key_pem",
    "is_certificate",
    "key_id",
    "public_key_of",
    "public_key_pem",
    "read_key_hint",
    "sign_file",
    "signing_certificate",
    "verify_self_consistent",
    "verify_with_ca",
    "verify_with_key",
]

#: A bundle over one file is about 1.5 KiB; anything far larger is not one.
MAX_SIGNATURE_BYTES = 64 * 1024


class SignatureError(ArtifactError):
    """A signature that is malformed, does not verify, or covers other bytes."""


@dataclass(frozen=True)
class SignedDigest:
    """What a verified signature vouches for."""

    key_id: str
    sha256: str
    #: The signing certificate's subject (RFC 4514), for a certificate signature.
    subject: str = ""


def public_key_pem(pem: bytes) -> bytes:
    """The canonical PEM (SubjectPublicKeyInfo) of an elliptic-curve public key, as OMS bundles hash it.

    Raises:
        SignatureError: If ``pem`` is not an EC public key on P-256, P-384 or P-521.
    """
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise SignatureError("not a PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise SignatureError("only elliptic-curve keys on P-256, P-384 or P-521 are supported")
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id(pem: bytes) -> str:
    """The key's identifier: the hex sha256 of its canonical PEM (the ``hint`` OMS bundles carry)."""
    return hashlib.sha256(public_key_pem(pem)).hexdigest()


def read_key_hint(bundle: bytes) -> str:
    """The signing key's id a bundle names (empty: none, e.g. a certificate signature).

    Raises:
        SignatureError: If ``bundle`` is not a Sigstore bundle.
    """
    if len(bundle) > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"a signature is at most {MAX_SIGNATURE_BYTES} bytes")
    try:
        document = json.loads(bundle)
        if "dsseEnvelope" not in document:
            raise SignatureError("the bundle has no DSSE envelope (not an OpenSSF model signature)")
        return str(document.get("verificationMaterial", {}).get("publicKey", {}).get("hint", ""))
    except (ValueError, AttributeError):
        raise SignatureError("the signature is not a Sigstore bundle (JSON)") from None


def sign_file(
    path: Path,
    private_key: Path,
    password: str | None = None,
    *,
    certificate: Path | None = None,
    chain: tuple[Path, ...] = (),
) -> bytes:
    """An OMS signature (Sigstore bundle JSON) over the file at ``path``, with an EC private key (offline).

    With ``certificate`` (the key's signing certificate) and ``chain`` (its issuers), the bundle carries
    the certificates instead of a key hint; ``password`` is not supported then (model_signing's limit).
    """
    from model_signing import signing  # heavy import, only where signing happens

    with tempfile.TemporaryDirectory(prefix="maas-sign-") as tmp:
        out = Path(tmp) / "model.sig"
        config = signing.Config()
        if certificate is not None:
            config.use_certificate_signer(
                private_key=private_key, signing_certificate=certificate, certificate_chain=chain
            )
        else:
            config.use_elliptic_key_signer(private_key=private_key, password=password)
        config.sign(path, out)
        return out.read_bytes()


def public_key_of(private_key: Path, password: str | None = None) -> bytes:
    """The public key PEM of an elliptic-curve private key file (what the registry checks a signature with)."""
    try:
        key = serialization.load_pem_private_key(private_key.read_bytes(), password.encode() if password else None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{private_key}: not a usable PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SignatureError(f"{private_key}: only elliptic-curve keys are supported")
    return public_key_pem(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def verify_with_key(bundle: bytes, public_key: bytes) -> SignedDigest:
    """Verifies ``bundle`` with ``public_key`` (PEM) and returns the one file digest it signs.

    Raises:
        SignatureError: If the bundle is malformed, was not made by this key, or does not sign one file's
            sha256.
    """
    from model_signing._signing import sign_ec_key

    pem = public_key_pem(public_key)
    read_key_hint(bundle)
    with tempfile.TemporaryDirectory(prefix="maas-verify-") as tmp:
        key_path = Path(tmp) / "key.pem"
        key_path.write_bytes(pem)
        manifest = _verify(bundle, Path(tmp), lambda: sign_ec_key.Verifier(key_path), f"key {key_id(pem)[:16]}")
    return SignedDigest(key_id=key_id(pem), sha256=_one_digest(manifest))


def signing_certificate(bundle: bytes) -> x509.Certificate | None:
    """The signing certificate a bundle carries (None: a key signature).

    Raises:
        SignatureError: If ``bundle`` is not a Sigstore bundle, or its certificate is malformed.
    """
    read_key_hint(bundle)
    try:
        chain = json.loads(bundle).get("verificationMaterial", {}).get("x509CertificateChain", {})
        certificates = chain.get("certificates") or []
        if not certificates:
            return None
        certificate = x509.load_der_x509_certificate(base64.b64decode(certificates[0]["rawBytes"]))
        certificate.public_key()  # a key type cryptography cannot read fails here, not later
        return certificate
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, binascii.Error):
        raise SignatureError("the bundle's signing certificate is malformed") from None


def certificate_key_pem(certificate: x509.Certificate) -> bytes:
    """The canonical PEM of a certificate's public key (see :func:`public_key_pem`)."""
    key = certificate.public_key()
    return public_key_pem(key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def verify_self_consistent(bundle: bytes) -> SignedDigest:
    """Verifies a certificate signature with its own signing certificate's key (no trust decision: that is
    :func:`verify_with_ca`'s, where a version is loaded) and returns the one file digest it signs.

    Raises:
        SignatureError: If the bundle carries no certificate, its signature does not verify with the
            certificate's key, or it does not sign one file's sha256.
    """
    from model_signing._signing import sign_ec_key, sign_sigstore_pb

    certificate = signing_certificate(bundle)
    if certificate is None:
        raise SignatureError("the signature carries no certificate: name the public key that made it")
    public = certificate.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise SignatureError("only elliptic-curve signing certificates are supported")
    key: ec.EllipticCurvePublicKey = public

    class LeafKeyVerifier(sign_sigstore_pb.Verifier):
        def _verify_bundle(self, parsed: Any) -> tuple[str, bytes]:
            envelope = parsed.dsse_envelope
            key.verify(
                envelope.signatures[0].sig,
                sign_sigstore_pb.pae(envelope.payload),
                ec.ECDSA(sign_ec_key.get_ec_key_hash(key)),
            )
            return str(envelope.payload_type), bytes(envelope.payload)

    with tempfile.TemporaryDirectory(prefix="maas-verify-") as tmp:
        manifest = _verify(bundle, Path(tmp), LeafKeyVerifier, "its signing certificate's key")
    return SignedDigest(
        key_id(certificate_key_pem(certificate)), _one_digest(manifest), certificate.subject.rfc4514_string()
    )


def verify_with_ca(bundle: bytes, ca_pem: bytes) -> SignedDigest:
    """Verifies a certificate signature whose signing certificate chains to a certificate of ``ca_pem``
    (one or more CA certificates) and may sign, and returns the one file digest it signs.

    Raises:
        SignatureError: If the bundle carries no certificate, the chain does not lead to these CAs, the
            certificate may not sign, the signature does not verify, or it does not sign one file's sha256.
    """
    from model_signing._signing import sign_certificate

    certificate = signing_certificate(bundle)
    if certificate is None:
        raise SignatureError("the signature carries no certificate")
    with tempfile.TemporaryDirectory(prefix="maas-verify-") as tmp:
        ca_path = Path(tmp) / "ca.pem"
        ca_path.write_bytes(ca_pem)
        manifest = _verify(bundle, Path(tmp), lambda: sign_certificate.Verifier([ca_path]), "the trusted CA")
    return SignedDigest(
        key_id(certificate_key_pem(certificate)), _one_digest(manifest), certificate.subject.rfc4514_string()
    )


def ca_certificates_pem(pem: bytes) -> bytes:
    """The canonical PEM of a trust anchor made of CA certificates (a root, and intermediates if any).

    Raises:
        SignatureError: If ``pem`` holds no certificate, or one that is not a CA's (basicConstraints CA).
    """
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise SignatureError("not PEM certificates") from None
    for certificate in certificates:
        try:
            is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            subject = certificate.subject.rfc4514_string()
            raise SignatureError(f"certificate {subject!r} is not a CA certificate (basicConstraints CA:TRUE)")
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def is_certificate(pem: bytes) -> bool:
    """Whether a trust policy entry's PEM holds certificates (else it is a public key)."""
    return b"-----BEGIN CERTIFICATE-----" in pem


def anchor_id(pem: bytes) -> str:
    """A trust policy entry's id: :func:`key_id` of a key, the hex sha256 of a CA certificate's DER."""
    if is_certificate(pem):
        return hashlib.sha256(
            x509.load_pem_x509_certificates(pem)[0].public_bytes(serialization.Encoding.DER)
        ).hexdigest()
    return key_id(pem)


def _verify(bundle: bytes, tmp: Path, verifier: Callable[[], Any], what: str) -> Any:
    from model_signing._signing import sign_sigstore_pb

    bundle_path = tmp / "model.sig"
    bundle_path.write_bytes(bundle)
    try:
        signature = sign_sigstore_pb.Signature.read(bundle_path)
        return verifier().verify(signature)
    except Exception as exc:  # noqa: BLE001 - the library raises many types for a bad signature
        raise SignatureError(f"the signature does not verify with {what}: {exc or type(exc).__name__}") from None


def _one_digest(manifest: Any) -> str:
    descriptors = list(manifest.resource_descriptors())
    if len(descriptors) != 1 or descriptors[0].digest.algorithm != "sha256":
        raise SignatureError(
            f"the signature lists {len(descriptors)} file(s); a maas artifact is one file signed with sha256"
        )
    return str(descriptors[0].digest.digest_hex)
