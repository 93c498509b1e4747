"""Which signatures of a version count under a tenant's trust policy.

A policy entry (a trust anchor) is either an elliptic-curve public key, which trusts the signatures it made,
or CA certificates, which trust the certificate signatures whose signing certificate chains to them. The
worker asks this before it loads a version where a signature is required, and the scheduler before it
accepts such a deployment. Pure (no grpc, no generated code); it verifies signatures, so callers run it on
a thread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shared.artifacts import signing

__all__ = ["RecordedSignature", "TrustAnchor", "trusted_signers"]


@dataclass(frozen=True)
class TrustAnchor:
    """One entry of a tenant's trust policy."""

    name: str
    #: :func:`signing.anchor_id` of ``pem``.
    anchor_id: str
    #: A public key, or CA certificates (PEM).
    pem: bytes

    @property
    def is_ca(self) -> bool:
        return signing.is_certificate(self.pem)


@dataclass(frozen=True)
class RecordedSignature:
    """A signature the registry holds for a version: the signing key's id and the bundle."""

    key_id: str
    bundle: bytes


def trusted_signers(
    signatures: Sequence[RecordedSignature], anchors: Sequence[TrustAnchor], sha256: str, tenant: str
) -> tuple[tuple[str, ...], str]:
    """The signers (``"anchor name (signing key id prefix)"``) whose signatures verify under ``anchors`` and
    sign ``sha256``, and else why none does (empty when one does).

    Each signature is verified here, not taken from the registry's record: a key signature with the
    trusted key, a certificate signature through the trusted CA certificates.
    """
    if not signatures:
        return (), "the version is not signed"
    keys = {a.anchor_id: a for a in anchors if not a.is_ca}
    authorities = [a for a in anchors if a.is_ca]
    signers: list[str] = []
    problems: list[str] = []
    for signature in signatures:
        key = keys.get(signature.key_id)
        try:
            certificate = signing.signing_certificate(signature.bundle)
        except signing.SignatureError as exc:
            problems.append(str(exc))
            continue
        if key is not None:
            signer, failures = _first_verifying([key], signing.verify_with_key, signature.bundle, sha256)
        elif certificate is not None and authorities:
            signer, failures = _first_verifying(authorities, signing.verify_with_ca, signature.bundle, sha256)
        else:
            what = f"certificate {certificate.subject.rfc4514_string()!r} of key" if certificate else "key"
            problems.append(f"{what} {signature.key_id[:16]} is not trusted by tenant {tenant!r}")
            continue
        if signer:
            signers.append(signer)
        else:
            problems.extend(failures)
    return tuple(signers), "; ".join(problems)


def _first_verifying(
    anchors: Sequence[TrustAnchor], verify: Callable[[bytes, bytes], signing.SignedDigest], bundle: bytes, sha256: str
) -> tuple[str, list[str]]:
    failures: list[str] = []
    for anchor in anchors:
        try:
            signed = verify(bundle, anchor.pem)
        except signing.SignatureError as exc:
            failures.append(f"{anchor.name!r}: {exc}")
            continue
        if signed.sha256 != sha256:
            failures.append(f"the signature verified by {anchor.name!r} signs sha256 {signed.sha256}, not these bytes")
            continue
        return f"{anchor.name} ({signed.key_id[:16]})", []
    return "", failures
