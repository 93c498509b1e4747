"""The default artifact store: a local directory, content-addressed by sha256 (of the plaintext).

Layout: ``<root>/sha256/ab/cd/<digest>`` for artifacts and ``<root>/tmp/`` for uploads in progress. A
commit is write, fsync, rename, fsync of the directory: after a crash a file either has all its bytes
under its digest or sits in tmp/, which the next start sweeps. Paths are built from digests the store
computed itself, never from names a client sent. With a ``BlobCipher`` new blobs are encrypted as they are
written (``shared.artifacts.crypto``) while the digest stays that of the plaintext, so identical uploads are
still stored once; blobs written without one are still read as they are.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from services.registry.core.ports import ArtifactWriter
from shared.artifacts.crypto import MAGIC, BlobCipher, BlobIntegrityError, StreamEncryptor

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
# Reads of an encrypted blob's raw bytes: about one ciphertext chunk each.
RAW_READ_BYTES = 1024 * 1024 + 4096


class LocalWriter:
    """Writes one artifact to a temporary file, hashing the plaintext as it goes (encrypting it with one)."""

    def __init__(self, path: Path, encryptor: StreamEncryptor | None = None) -> None:
        self.path = path
        self._file = path.open("xb")
        self._hash = hashlib.sha256()
        self._encryptor = encryptor
        # Writes run in worker threads; abort may come from another one when a client hangs up.
        self._lock = threading.Lock()
        self.closed = False

    def write(self, chunk: bytes) -> None:
        with self._lock:
            if self.closed:
                raise RuntimeError("write after abort")
            self._hash.update(chunk)
            self._file.write(self._encryptor.update(chunk) if self._encryptor else chunk)

    def hexdigest(self) -> str:
        with self._lock:
            return self._hash.hexdigest()

    def finish(self) -> None:
        with self._lock:
            if self._encryptor is not None:
                self._file.write(self._encryptor.finalize())
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self.closed = True

    def abort(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()
            self.closed = True
            self.path.unlink(missing_ok=True)


class LocalArtifactStore:
    """Implements ``core.ports.ArtifactStore`` on a local directory."""

    def __init__(self, root: Path, cipher: BlobCipher | None = None, *, encrypt: bool = True) -> None:
        self.root = root
        # ``cipher`` reads encrypted blobs; new ones are encrypted with it when ``encrypt`` is set.
        self.cipher = cipher
        self.encrypt = encrypt and cipher is not None
        self._tmp = root / "tmp"
        self._blobs = root / "sha256"
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._blobs.mkdir(parents=True, exist_ok=True)

    def _path(self, sha256: str) -> Path:
        if not _DIGEST.fullmatch(sha256):
            raise ValueError(f"not a sha256 digest: {sha256!r}")
        return self._blobs / sha256[:2] / sha256[2:4] / sha256

    def free_bytes(self) -> int:
        return shutil.disk_usage(self._tmp).free

    def writer(self) -> LocalWriter:
        return LocalWriter(
            self._tmp / f"{uuid.uuid4().hex}.part", self.cipher.encryptor() if self.cipher and self.encrypt else None
        )

    def commit(self, writer: ArtifactWriter) -> bool:
        assert isinstance(writer, LocalWriter), "writers come from this store"
        digest = writer.hexdigest()
        writer.finish()
        final = self._path(digest)
        if final.exists():
            # Identical bytes are stored once.
            writer.path.unlink(missing_ok=True)
            return False
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(writer.path, final)
        _fsync_dir(final.parent)
        return True

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).exists()

    def read(self, sha256: str, offset: int, chunk_size: int) -> Iterator[bytes]:
        path = self._path(sha256)
        if self.cipher is None:
            return _file_chunks(path, offset, chunk_size)
        path.stat()  # a missing blob fails here, not at the first chunk
        return self.cipher.read(lambda at: _file_chunks(path, at, RAW_READ_BYTES), offset, chunk_size)

    @contextlib.contextmanager
    def local_copy(self, sha256: str) -> Iterator[Path]:
        path = self._path(sha256)
        with path.open("rb") as fh:
            encrypted = fh.read(8) == MAGIC
        if not encrypted:
            yield path
            return
        if self.cipher is None:
            raise BlobIntegrityError("the blob is encrypted and this registry has no key-encryption key")
        plain = self._tmp / f"{uuid.uuid4().hex}.plain"
        try:
            with plain.open("xb") as out:
                for block in self.read(sha256, 0, 4 * 1024 * 1024):
                    out.write(block)
            yield plain
        finally:
            plain.unlink(missing_ok=True)

    def delete(self, sha256: str) -> None:
        self._path(sha256).unlink(missing_ok=True)

    def sweep(self, keep: set[str]) -> int:
        removed = 0
        for part in self._tmp.iterdir():
            part.unlink(missing_ok=True)
            removed += 1
        for blob in self._blobs.glob("*/*/*"):
            if blob.name not in keep:
                blob.unlink(missing_ok=True)
                removed += 1
        return removed


def _file_chunks(path: Path, offset: int, chunk_size: int) -> Iterator[bytes]:
    fh = path.open("rb")

    def chunks() -> Iterator[bytes]:
        with fh:
            fh.seek(offset)
            while block := fh.read(chunk_size):
                yield block

    return chunks()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
