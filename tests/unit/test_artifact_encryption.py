"""Chunked AES-256-GCM blobs (shared.artifacts.crypto): round trips from any offset, and every tampering refused."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shared.artifacts.crypto import MAGIC, TAG_BYTES, BlobCipher, BlobIntegrityError, LocalKms

CHUNK = 1000


def _cipher(kek: bytes | None = None, chunk: int = CHUNK) -> BlobCipher:
    return BlobCipher(LocalKms(kek or bytes(range(32))), chunk)


def encrypt(cipher: BlobCipher, data: bytes, piece: int = 777) -> bytes:
    enc = cipher.encryptor()
    out = b"".join(enc.update(data[i : i + piece]) for i in range(0, len(data), piece))
    return out + enc.finalize()


def opener(blob: bytes, piece: int = 333) -> Callable[[int], Iterator[bytes]]:
    def open_raw(offset: int) -> Iterator[bytes]:
        return iter([blob[i : i + piece] for i in range(offset, len(blob), piece)])

    return open_raw


def decrypt(cipher: BlobCipher, blob: bytes, offset: int = 0, out: int = 4096) -> bytes:
    return b"".join(cipher.read(opener(blob), offset, out))


@pytest.mark.parametrize("size", [1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK, 5 * CHUNK + 17])
def test_round_trip_from_every_kind_of_offset(size: int) -> None:
    cipher = _cipher()
    data = os.urandom(size)
    blob = encrypt(cipher, data)
    assert blob.startswith(MAGIC)
    if size >= 16:  # a short random plaintext turns up in random ciphertext by chance (1 byte: most runs)
        assert data not in blob
    for offset in {0, 1, CHUNK - 1, CHUNK, CHUNK + 1, size // 2, size - 1, size}:
        if offset <= size:
            assert decrypt(cipher, blob, offset, out=64) == data[offset:], offset


def test_identical_plaintexts_give_different_blobs_under_fresh_data_keys() -> None:
    cipher, data = _cipher(), os.urandom(3 * CHUNK)
    assert encrypt(cipher, data) != encrypt(cipher, data)


def _flip(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 0x01]) + blob[at + 1 :]


def test_a_flipped_bit_anywhere_is_detected() -> None:
    cipher, data = _cipher(), os.urandom(3 * CHUNK + 5)
    blob = encrypt(cipher, data)
    header = len(blob) - len(data) - 4 * TAG_BYTES
    for at in [12, header - 2, header, header + CHUNK + 3, len(blob) - 1]:
        with pytest.raises(BlobIntegrityError):
            decrypt(cipher, _flip(blob, at))


def test_a_truncated_or_reordered_blob_is_detected() -> None:
    cipher, data = _cipher(), os.urandom(3 * CHUNK)
    blob = encrypt(cipher, data)
    sealed = CHUNK + TAG_BYTES
    header = len(blob) - 3 * sealed
    with pytest.raises(BlobIntegrityError):  # the last chunk dropped: the new last one lacks the final flag
        decrypt(cipher, blob[: header + 2 * sealed])
    swapped = blob[:header] + blob[header + sealed : header + 2 * sealed] + blob[header : header + sealed]
    with pytest.raises(BlobIntegrityError):
        decrypt(cipher, swapped + blob[header + 2 * sealed :])


def test_nothing_of_a_bad_chunk_is_returned() -> None:
    cipher, data = _cipher(), os.urandom(3 * CHUNK)
    blob = _flip(encrypt(cipher, data), len(encrypt(cipher, data)) - CHUNK)  # inside the last chunk
    got = bytearray()
    with pytest.raises(BlobIntegrityError):
        for piece in cipher.read(opener(blob), 0, 10_000):
            got += piece
    assert bytes(got) == data[: 2 * CHUNK]


def test_another_kek_cannot_read_and_blobs_from_before_read_as_they_are(tmp_path: Path) -> None:
    data = os.urandom(2 * CHUNK)
    blob = encrypt(_cipher(), data)
    with pytest.raises(BlobIntegrityError, match="KEK"):
        decrypt(_cipher(bytes(32)), blob)
    plain = b"\x10\x00\x00\x00\x00\x00\x00\x00" + data  # a safetensors-looking blob stored before encryption
    assert decrypt(_cipher(), plain, 100) == plain[100:]


def test_the_kek_file_is_created_once_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "kek.key"
    first = LocalKms.from_file(path, create=True)
    assert path.stat().st_mode & 0o777 == 0o600
    assert LocalKms.from_file(path, create=True).key_id == first.key_id
    assert LocalKms.from_text(path.read_text()).key_id == first.key_id
    with pytest.raises(ValueError, match="32 bytes"):
        LocalKms.from_text(base64.b64encode(b"short").decode())
