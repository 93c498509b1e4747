"""Signatures over artifacts in the OpenSSF Model Signing (OMS) format, with the ``model_signing`` package.

A signature is a Sigstore bundle whose DSSE envelope carries an in-toto statement listing each signed
file's digest. maas artifacts are one file, so a signature is good for a version when its statement lists
exactly one file whose sha256 is the version's: that holds both for a signature over the file itself
(``model_signing sign key model.safetensors``) and over a directory holding only it.

Signing uses ``model_signing``'s public API (elliptic-curve private keys work offline). Verification uses
its verifiers on the bundle alone and compares the signed digest with the digest the caller already
computed from the bytes: the bytes are hashed once per load, not once more for the signature. That needs
``model_signing``'s verifier classes, which are not part of its documented API: the version is pinned.

Pure (no grpc, no generated code).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shared.artifacts.errors import ArtifactError

__all__ = [
    "MAX_SIGNATURE_BYTES",
    "SignatureError",
    "SignedDigest",
    "key_id",
    "public_key_of",
    "public_key_pem",
    "read_key_hint",
    "sign_file",
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


def sign_file(path: Path, private_key: Path, password: str | None = None) -> bytes:
    """An OMS signature (Sigstore bundle JSON) over the file at ``path``, with an EC private key (offline)."""
    from model_signing import signing  # heavy import, only where signing happens

    with tempfile.TemporaryDirectory(prefix="maas-sign-") as tmp:
        out = Path(tmp) / "model.sig"
        signing.Config().use_elliptic_key_signer(private_key=private_key, password=password).sign(path, out)
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
    from model_signing._signing import sign_ec_key, sign_sigstore_pb

    pem = public_key_pem(public_key)
    read_key_hint(bundle)
    with tempfile.TemporaryDirectory(prefix="maas-verify-") as tmp:
        bundle_path, key_path = Path(tmp) / "model.sig", Path(tmp) / "key.pem"
        bundle_path.write_bytes(bundle)
        key_path.write_bytes(pem)
        try:
            signature = sign_sigstore_pb.Signature.read(bundle_path)
            manifest = sign_ec_key.Verifier(key_path).verify(signature)
        except Exception as exc:  # noqa: BLE001 - the library raises many types for a bad signature
            raise SignatureError(f"the signature does not verify with key {key_id(pem)[:16]}: {exc}") from None
    descriptors = list(manifest.resource_descriptors())
    if len(descriptors) != 1 or descriptors[0].digest.algorithm != "sha256":
        raise SignatureError(
            f"the signature lists {len(descriptors)} file(s); a maas artifact is one file signed with sha256"
        )
    return SignedDigest(key_id=key_id(pem), sha256=descriptors[0].digest.digest_hex)
