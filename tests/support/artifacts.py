"""Small real artifacts and raw upload streams for registry tests."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

from maas.registry.v1 import registry_pb2 as pb

TINY_MLP = {"in_features": 4, "hidden": [8], "out_features": 3}


def tiny_artifact(tmp: Path, seed: int = 0, arguments: dict | None = None, name: str = "tiny") -> tuple[Path, str]:
    """A real safetensors artifact of a small zoo MLP and its manifest JSON."""
    import torch

    from shared.artifacts import Manifest, build_model, save_artifact

    torch.manual_seed(seed)
    manifest = Manifest.for_model("mlp", arguments or TINY_MLP)
    path = tmp / f"{name}-{seed}.safetensors"
    save_artifact(build_model(manifest), manifest, path)
    return path, manifest.to_json()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload_messages(
    model: str,
    data: bytes,
    manifest_json: str,
    *,
    declared_sha: str | None = None,
    declared_size: int | None = None,
    chunk: int = 64 * 1024,
    create_model: bool = True,
    tags: dict[str, str] | None = None,
) -> list[pb.UploadVersionRequest]:
    meta = pb.UploadMetadata(
        model=model,
        manifest_json=manifest_json,
        sha256=declared_sha if declared_sha is not None else sha256(data),
        size_bytes=declared_size if declared_size is not None else len(data),
        create_model=create_model,
        tags=tags or {},
    )
    messages = [pb.UploadVersionRequest(metadata=meta)]
    messages += [pb.UploadVersionRequest(chunk=data[i : i + chunk]) for i in range(0, len(data), chunk)]
    return messages


async def as_stream(messages: Iterable[pb.UploadVersionRequest]) -> AsyncIterator[pb.UploadVersionRequest]:
    for message in messages:
        yield message


def rewrite_header(data: bytes, edit) -> bytes:  # type: ignore[no-untyped-def]
    """The same safetensors bytes with ``edit(header_dict)`` applied to the JSON header (lengths kept honest)."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + length :]
