"""Checks of uploaded bytes: the safetensors header is read from the stream's first bytes as they pass.

Keeping only the header (not the file) in memory lets any artifact store, local or remote, be checked
before the version is committed, at a memory cost bounded by MAX_HEADER_BYTES.
"""

from __future__ import annotations

import io
import struct

from shared.artifacts import ArtifactError, Manifest, check_weights, read_header, tensor_table
from shared.errors import InvalidArgument

# Real headers are a few KiB to a few MiB (one JSON entry per tensor).
MAX_HEADER_BYTES = 16 * 1024 * 1024


class HeaderCollector:
    """Keeps the first ``8 + header length`` bytes of a safetensors stream."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._needed: int | None = None

    @property
    def data(self) -> bytes:
        return bytes(self._buffer)

    def feed(self, chunk: bytes) -> None:
        if self._needed is not None and len(self._buffer) >= self._needed:
            return
        want = (self._needed or 8) - len(self._buffer)
        self._buffer += chunk[:want]
        if self._needed is None and len(self._buffer) >= 8:
            (length,) = struct.unpack("<Q", self._buffer[:8])
            if length > MAX_HEADER_BYTES:
                raise InvalidArgument.field(
                    "chunk", f"safetensors header of {length} bytes exceeds the {MAX_HEADER_BYTES}-byte limit"
                )
            self._needed = 8 + length
            self.feed(chunk[want:])


def check_artifact(manifest: Manifest, head: HeaderCollector, size: int) -> None:
    """The bytes are a well-formed safetensors file whose tensors are exactly what the manifest needs."""
    try:
        header, _ = read_header(io.BytesIO(head.data), file_size=size)
        check_weights(manifest, tensor_table(header))
    except ArtifactError as exc:
        raise InvalidArgument.field("chunk", f"artifact rejected: {exc}", reason="BAD_ARTIFACT") from exc
