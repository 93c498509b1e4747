"""Writing secrets to disk: atomically, and never readable by anyone else, not even for a moment."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path``: readers see the old file or the new one, with ``mode`` from the first byte.

    The parent directory is created with mode 0700 when missing.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # open()'s mode is masked by the umask; set it exactly
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def ensure_secret(path: Path, min_length: int = 32) -> str:
    """The random token stored at ``path``, generated (0600) when missing or too short."""
    try:
        token = path.read_text().strip()
    except OSError:
        token = ""
    if len(token) < min_length:
        token = secrets.token_urlsafe(max(32, min_length))
        write_atomic(path, token.encode())
    return token
