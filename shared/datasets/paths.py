"""Resolving and reading user-named files safely."""

from __future__ import annotations

import os
from pathlib import Path

from shared.datasets.options import option_field
from shared.datasets.source import MAX_FILE_BYTES
from shared.errors import InvalidArgument

__all__ = ["read_user_file", "resolve_root"]


def resolve_root(data_root: str | os.PathLike[str] | None) -> Path | None:
    """Returns the data root made absolute, or None (no confinement)."""
    return None if data_root is None else Path(data_root).resolve()


def read_user_file(path: str, data_root: Path | None) -> bytes:
    """Reads a whole file named by a client.

    Relative paths are taken relative to ``data_root`` (else the working directory). With a data root,
    the resolved path (symlinks followed) must stay inside it: a client must not be able to train a model
    on, and so leak, any file the server can read. Messages quote the client's path, never the resolved
    one, so they reveal nothing about the server's layout.

    Raises:
        InvalidArgument: If the file is outside the root, missing, not a regular file, unreadable or larger
            than :data:`~shared.datasets.source.MAX_FILE_BYTES`.
    """
    field = option_field("path")
    if "\0" in path:
        raise InvalidArgument.field(field, "must not contain NUL characters")
    if data_root is None:
        full = Path(path).resolve()
    else:
        full = (data_root / path).resolve()
        if not full.is_relative_to(data_root):
            raise InvalidArgument.field(field, f"{path!r} is outside the data directory")
    if not full.exists():
        raise InvalidArgument.field(field, f"file {path!r} does not exist")
    if not full.is_file():
        raise InvalidArgument.field(field, f"{path!r} is not a regular file")
    try:
        with full.open("rb") as stream:
            # Read one byte past the limit rather than trusting stat(): the file may grow meanwhile.
            data = stream.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise InvalidArgument.field(field, f"cannot read {path!r}: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise InvalidArgument.field(field, f"{path!r} is larger than the limit of {MAX_FILE_BYTES:,} bytes")
    return data
