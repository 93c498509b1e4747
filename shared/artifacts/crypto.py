"""Encryption of artifact blobs at rest: AES-256-GCM in fixed-size chunks, per-blob data keys, a KEK behind a KMS.

A blob is ``MAGIC | u32 header length | header JSON | chunk 0 | chunk 1 | ...``. The header names the KEK
(``kek``), the data key wrapped by it (``wrapped``), the plaintext chunk size and a random 7-byte nonce
prefix. Chunk ``i`` is ``AES-GCM(data key, nonce = prefix | u32 i | final flag, aad = header)`` of
``chunk_size`` plaintext bytes (the last one shorter): the STREAM construction, so a chunk can be neither
altered, moved, dropped nor appended, and a blob cut short is detected (its last chunk lacks the final flag).

Fixed-size chunks make any plaintext offset a computable ciphertext offset: a resumed download decrypts
from the chunk holding its offset, and memory stays one chunk whatever the blob's size. Blobs written
before encryption was turned on have no magic and are read as they are.

This module is pure (no grpc, no generated code): the registry's stores and offline tools share it.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared.artifacts.errors import ArtifactError

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MAGIC",
    "BlobCipher",
    "BlobIntegrityError",
    "Kms",
    "LocalKms",
    "StreamEncryptor",
]

MAGIC = b"MAASENC1"
TAG_BYTES = 16
DEFAULT_CHUNK_BYTES = 1024 * 1024
_PREFIX = struct.Struct("<8sI")
_MAX_HEADER = 64 * 1024
_WRAP_AAD = b"maas-artifact-data-key"


class BlobIntegrityError(ArtifactError):
    """A stored blob failed authentication: altered, truncated, or under a key this KMS does not hold."""


class Kms(Protocol):
    """Wraps and unwraps data keys with a key-encryption key it never reveals (a cloud KMS fits here)."""

    @property
    def key_id(self) -> str:
        """The KEK new data keys are wrapped with (recorded in each blob's header)."""
        ...

    def wrap(self, data_key: bytes) -> bytes: ...
    def unwrap(self, key_id: str, wrapped: bytes) -> bytes:
        """The data key; raises :class:`BlobIntegrityError` when ``key_id`` is unknown or ``wrapped`` was altered."""
        ...


class LocalKms:
    """A KEK held in this process: from a file or an environment variable (base64 of 32 bytes).

    The key id is a fingerprint of the key, so a blob names the KEK it needs without revealing it.
    """

    def __init__(self, kek: bytes) -> None:
        if len(kek) != 32:
            raise ValueError(f"a key-encryption key is 32 bytes (AES-256), got {len(kek)}")
        self._aead = AESGCM(kek)
        self._key_id = "local:" + AESGCM(kek).encrypt(b"\0" * 12, b"", b"maas-kek-id").hex()[:16]

    @classmethod
    def from_text(cls, text: str) -> LocalKms:
        try:
            return cls(base64.b64decode(text.strip(), validate=True))
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"the key-encryption key must be base64 of 32 bytes: {exc}") from None

    @classmethod
    def from_file(cls, path: Path, *, create: bool = False) -> LocalKms:
        """The KEK in ``path``; with ``create``, a new random one is written there first when it is missing."""
        if create and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
        return cls.from_text(path.read_text())

    @property
    def key_id(self) -> str:
        return self._key_id

    def wrap(self, data_key: bytes) -> bytes:
        nonce = secrets.token_bytes(12)
        return nonce + self._aead.encrypt(nonce, data_key, _WRAP_AAD)

    def unwrap(self, key_id: str, wrapped: bytes) -> bytes:
        if key_id != self._key_id:
            raise BlobIntegrityError(f"the blob's data key is wrapped by KEK {key_id!r}, not {self._key_id!r}")
        try:
            return self._aead.decrypt(wrapped[:12], wrapped[12:], _WRAP_AAD)
        except InvalidTag:
            raise BlobIntegrityError("the blob's wrapped data key failed authentication") from None


def _nonce(prefix: bytes, index: int, final: bool) -> bytes:
    return prefix + struct.pack(">I?", index, final)


class StreamEncryptor:
    """Encrypts one blob as it is written: plaintext in, blob bytes out (header first)."""

    def __init__(self, kms: Kms, chunk_bytes: int) -> None:
        data_key = AESGCM.generate_key(bit_length=256)
        self._aead = AESGCM(data_key)
        self._prefix = secrets.token_bytes(7)
        body = json.dumps(
            {
                "v": 1,
                "kek": kms.key_id,
                "wrapped": base64.b64encode(kms.wrap(data_key)).decode(),
                "chunk": chunk_bytes,
                "nonce": self._prefix.hex(),
            },
            sort_keys=True,
        ).encode()
        self._header = _PREFIX.pack(MAGIC, len(body)) + body
        self._chunk = chunk_bytes
        self._buffer = bytearray()
        self._index = 0
        self._started = False

    def update(self, plaintext: bytes) -> bytes:
        """Blob bytes for every chunk completed by ``plaintext`` (the last full one is held back: it may be final)."""
        out = bytearray()
        if not self._started:
            out += self._header
            self._started = True
        self._buffer += plaintext
        # Keep at least one byte back: only finalize() knows which chunk is the last.
        while len(self._buffer) > self._chunk:
            out += self._seal(bytes(self._buffer[: self._chunk]), final=False)
            del self._buffer[: self._chunk]
        return bytes(out)

    def finalize(self) -> bytes:
        out = b"" if self._started else self._header
        self._started = True
        return out + self._seal(bytes(self._buffer), final=True)

    def _seal(self, chunk: bytes, *, final: bool) -> bytes:
        sealed = self._aead.encrypt(_nonce(self._prefix, self._index, final), chunk, self._header)
        self._index += 1
        return sealed


class _Bytes:
    """Exact reads over an iterator of byte strings of any sizes."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self._buffer = bytearray()

    def read(self, n: int) -> bytes:
        while len(self._buffer) < n:
            block = next(self.chunks, b"")
            if not block:
                break
            self._buffer += block
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    def close(self) -> None:
        close = getattr(self.chunks, "close", None)
        if close is not None:
            close()


@dataclass(frozen=True)
class BlobCipher:
    """What a store needs to write encrypted blobs and read any blob (encrypted or from before)."""

    kms: Kms
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    def encryptor(self) -> StreamEncryptor:
        return StreamEncryptor(self.kms, self.chunk_bytes)

    def ciphertext_overhead(self, plaintext_bytes: int) -> int:
        """Upper bound of the bytes encryption adds (for free-space checks)."""
        return 1024 + TAG_BYTES * (plaintext_bytes // self.chunk_bytes + 1)

    def read(self, open_raw: Callable[[int], Iterator[bytes]], offset: int, out_bytes: int) -> Iterator[bytes]:
        """The plaintext from ``offset``, in pieces of at most ``out_bytes``.

        Args:
            open_raw: Opens the stored blob at a byte offset, as an iterator of byte strings.

        Raises:
            BlobIntegrityError: As soon as a chunk fails authentication (nothing of it is returned).
        """
        head = _Bytes(open_raw(0))
        try:
            prefix = head.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size or prefix[:8] != MAGIC:
                # A blob from before encryption was turned on: stored as it is.
                head.close()
                yield from _rechunk(open_raw(offset), out_bytes)
                return
            (length,) = struct.unpack("<I", prefix[8:])
            if length > _MAX_HEADER:
                raise BlobIntegrityError("the blob's encryption header is malformed")
            body = head.read(length)
            header = prefix + body
            aead, nonce_prefix, chunk = self._open_header(body)
        except BaseException:
            head.close()
            raise
        index, skip = divmod(offset, chunk)
        start = len(header) + index * (chunk + TAG_BYTES)
        if index:
            head.close()
            raw = _Bytes(open_raw(start))
        else:
            raw = head
        try:
            sealed = raw.read(chunk + TAG_BYTES)
            if not sealed and offset:
                return  # offset exactly at the end of a multi-chunk blob
            while sealed:
                following = raw.read(chunk + TAG_BYTES)
                final = not following
                try:
                    plain = aead.decrypt(_nonce(nonce_prefix, index, final), sealed, header)
                except InvalidTag:
                    raise BlobIntegrityError(f"chunk {index} of the blob failed authentication") from None
                if skip:
                    plain, skip = plain[skip:], 0
                for at in range(0, len(plain), out_bytes):
                    yield plain[at : at + out_bytes]
                sealed, index = following, index + 1
            if index == 0:
                raise BlobIntegrityError("the blob has no chunks")
        finally:
            raw.close()

    def _open_header(self, body: bytes) -> tuple[AESGCM, bytes, int]:
        try:
            fields = json.loads(body)
            wrapped = base64.b64decode(fields["wrapped"])
            nonce_prefix = bytes.fromhex(fields["nonce"])
            chunk = int(fields["chunk"])
            key_id = str(fields["kek"])
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise BlobIntegrityError("the blob's encryption header is malformed") from None
        if fields.get("v") != 1 or len(nonce_prefix) != 7 or chunk <= 0:
            raise BlobIntegrityError("the blob's encryption header is malformed")
        return AESGCM(self.kms.unwrap(key_id, wrapped)), nonce_prefix, chunk


def _rechunk(chunks: Iterator[bytes], out_bytes: int) -> Iterator[bytes]:
    try:
        for block in chunks:
            for at in range(0, len(block), out_bytes):
                yield block[at : at + out_bytes]
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def is_encrypted(first_bytes: bytes) -> bool:
    """Whether a blob starting with these bytes is an encrypted one."""
    return first_bytes[:8] == MAGIC
