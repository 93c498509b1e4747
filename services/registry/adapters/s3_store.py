"""An artifact store on S3-compatible object storage (AWS S3, MinIO, Ceph, ...).

Uploads spool to a local temporary file while they are hashed (the key is the digest, known only at the
end), then go to ``<prefix>sha256/<digest>`` in one managed (multipart, parallel) upload; an object appears
whole or not at all, so a crash leaves at most a local temp file, removed at the next start. Downloads
stream ranged GETs. Credentials come from boto3's usual chain (environment, config files, instance roles).
With a ``BlobCipher`` objects are encrypted in the spool as they arrive (the bucket only ever holds
ciphertext) and decrypted chunk by chunk on the way out; a resumed download starts its ranged GET at the
ciphertext chunk holding its offset.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from services.registry.adapters.local_store import LocalWriter
from services.registry.core.ports import ArtifactWriter
from shared.artifacts.crypto import BlobCipher

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class S3ArtifactStore:
    """Implements ``core.ports.ArtifactStore`` on a bucket (and key prefix)."""

    def __init__(
        self,
        url: str,
        spool_dir: Path,
        endpoint_url: str | None = None,
        client: Any = None,
        cipher: BlobCipher | None = None,
        *,
        encrypt: bool = True,
    ) -> None:
        # ``cipher`` reads encrypted objects; new ones are encrypted with it when ``encrypt`` is set.
        self.cipher = cipher
        self.encrypt = encrypt and cipher is not None
        if not url.startswith("s3://"):
            raise ValueError(f"not an s3:// URL: {url!r}")
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        self.bucket = bucket
        self.prefix = (prefix.rstrip("/") + "/") if prefix else ""
        self._spool = spool_dir
        self._spool.mkdir(parents=True, exist_ok=True)
        self._s3 = client or boto3.client(
            "s3", endpoint_url=endpoint_url, config=Config(retries={"max_attempts": 5, "mode": "standard"})
        )

    def _key(self, sha256: str) -> str:
        if not _DIGEST.fullmatch(sha256):
            raise ValueError(f"not a sha256 digest: {sha256!r}")
        return f"{self.prefix}sha256/{sha256}"

    def free_bytes(self) -> int:
        return shutil.disk_usage(self._spool).free

    def writer(self) -> LocalWriter:
        return LocalWriter(
            self._spool / f"{uuid.uuid4().hex}.part", self.cipher.encryptor() if self.cipher and self.encrypt else None
        )

    def commit(self, writer: ArtifactWriter) -> bool:
        assert isinstance(writer, LocalWriter), "writers come from this store"
        digest = writer.hexdigest()
        writer.finish()
        try:
            if self.exists(digest):
                return False
            self._s3.upload_file(str(writer.path), self.bucket, self._key(digest))
            return True
        finally:
            writer.path.unlink(missing_ok=True)

    def exists(self, sha256: str) -> bool:
        try:
            self._s3.head_object(Bucket=self.bucket, Key=self._key(sha256))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def read(self, sha256: str, offset: int, chunk_size: int) -> Iterator[bytes]:
        if self.cipher is None:
            return self._read_raw(sha256, offset, chunk_size)
        return self.cipher.read(lambda at: self._read_raw(sha256, at, 1024 * 1024), offset, chunk_size)

    def _read_raw(self, sha256: str, offset: int, chunk_size: int) -> Iterator[bytes]:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(sha256)}
        if offset:
            kwargs["Range"] = f"bytes={offset}-"
        try:
            body = self._s3.get_object(**kwargs)["Body"]
        except ClientError as exc:
            # A range starting exactly at the end is "not satisfiable": the rest is empty.
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return iter(())
            raise

        def chunks() -> Iterator[bytes]:
            with contextlib.closing(body):
                while block := body.read(chunk_size):
                    yield block

        return chunks()

    @contextlib.contextmanager
    def local_copy(self, sha256: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(dir=self._spool) as tmp:
            path = Path(tmp) / sha256
            if self.cipher is None:
                self._s3.download_file(self.bucket, self._key(sha256), str(path))
            else:
                with path.open("xb") as out:
                    for block in self.read(sha256, 0, 4 * 1024 * 1024):
                        out.write(block)
            yield path

    def delete(self, sha256: str) -> None:
        self._s3.delete_object(Bucket=self.bucket, Key=self._key(sha256))

    def sweep(self, keep: set[str], min_age: timedelta = timedelta(hours=1)) -> int:
        """Remove spool files and unreferenced objects older than ``min_age``: several registry replicas
        may share a bucket, and another one's object may not be committed to the database yet."""
        removed = 0
        cutoff = datetime.now(UTC) - min_age
        for part in self._spool.glob("*.part"):
            part.unlink(missing_ok=True)
            removed += 1
        paginator = self._s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}sha256/"):
            for item in page.get("Contents", []):
                if item["Key"].rsplit("/", 1)[-1] not in keep and item["LastModified"] < cutoff:
                    self._s3.delete_object(Bucket=self.bucket, Key=item["Key"])
                    removed += 1
        return removed
