"""Shard checkpoint files: one safetensors file, tensors plus a JSON document in its metadata.

safetensors (never pickle) means a checkpoint cannot run code when loaded. The commit is write to a
unique sibling, fsync, rename over the destination, fsync the directory: after a crash at any point
the destination holds either the previous checkpoint or the new one, never a mix; a leftover
``*.tmp`` sibling is garbage that readers never look at.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from shared.errors import InvalidArgument, NotFound

__all__ = ["FORMAT", "METADATA_KEY", "read_checkpoint", "should_checkpoint", "write_checkpoint"]

METADATA_KEY = "maas.paramserver"
FORMAT = 1


def should_checkpoint(step: int, interval: int) -> bool:
    """Whether to checkpoint once ``step`` steps are complete.

    Args:
        step: Completed steps (the shard's slowest clock).
        interval: Checkpoint every ``interval`` steps; 0 disables checkpoints.

    Raises:
        InvalidArgument: If ``interval`` is negative.
    """
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
        raise InvalidArgument.field("checkpoint_interval", f"must be an integer >= 0, got {interval!r}")
    return interval > 0 and step > 0 and step % interval == 0


def _fsync_path(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], document: dict[str, Any]) -> None:
    """Writes ``tensors`` and ``document`` (JSON-able) to ``path`` atomically and durably.

    Tensors must not share memory with each other (safetensors refuses aliases); pass clones.
    """
    dest = os.fspath(path)
    # A unique sibling on the same filesystem, so the rename is atomic and concurrent writers never clash.
    tmp = f"{dest}.{uuid.uuid4().hex}.tmp"
    metadata = {METADATA_KEY: json.dumps({"format": FORMAT, **document}, sort_keys=True)}
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        # Data must be on disk before the rename makes it visible, or a crash could expose a hole.
        _fsync_path(tmp, os.O_RDONLY)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # The rename itself lives in the directory entry.
    _fsync_path(str(Path(dest).parent), os.O_RDONLY)


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Reads a file written by :func:`write_checkpoint`.

    Returns:
        The tensors and the JSON document.

    Raises:
        NotFound: If there is no file at ``path``.
        InvalidArgument: If it is not a shard checkpoint of a known format.
    """
    src = os.fspath(path)
    if not os.path.isfile(src):
        raise NotFound(f"no checkpoint at {src}")
    try:
        with safetensors.safe_open(src, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (OSError, safetensors.SafetensorError) as exc:
        raise InvalidArgument(f"{src} is not a readable safetensors file: {exc}") from None
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        raise InvalidArgument(f"{src} is not a parameter-server checkpoint (no {METADATA_KEY} metadata)")
    try:
        document = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{src} has corrupt checkpoint metadata: {exc}") from None
    version = document.get("format") if isinstance(document, dict) else None
    if version != FORMAT:
        raise InvalidArgument(f"{src} has unsupported checkpoint format {version!r}")
    return tensors, document
