"""Checks of uploaded bytes: the safetensors header is read from the stream's first bytes as they pass.

Keeping only the header (not the file) in memory lets any artifact store, local or remote, be checked
before the version is committed, at a memory cost bounded by MAX_HEADER_BYTES.
"""

from __future__ import annotations

import io
import json
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

    @property
    def complete(self) -> bool:
        """The whole header has arrived (it can be checked before the weights that follow)."""
        return self._needed is not None and len(self._buffer) >= self._needed

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


def check_header_early(manifest: Manifest, head: HeaderCollector) -> None:
    """The tensors the header names are the ones the manifest's architecture needs: checked as soon as the
    header is in, so a wrong artifact is refused before its weights stream in. Offsets and coverage are
    checked against the real size once the stream ends (:func:`check_artifact`)."""
    try:
        check_weights(manifest, tensor_table(json.loads(head.data[8:])))
    except ArtifactError as exc:
        raise InvalidArgument.field("chunk", f"artifact rejected: {exc}", reason="BAD_ARTIFACT") from exc
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        raise InvalidArgument.field(
            "chunk", "artifact rejected: the safetensors header is not a JSON table of tensors", reason="BAD_ARTIFACT"
        ) from None
