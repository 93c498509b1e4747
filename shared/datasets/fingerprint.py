"""Content fingerprints that go into model lineage.

A fingerprint must be the same on every machine and NumPy version for the same data, so arrays are
hashed in a canonical form: little-endian, C order, preceded by their dtype and shape (two arrays with
the same bytes but different shapes or dtypes are different data).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["fingerprint_arrays", "fingerprint_bytes"]

# Versioned, so that a future change of the canonical form cannot collide with old fingerprints.
_DOMAIN = b"maas.datasets.arrays.v1\n"


def fingerprint_arrays(*arrays: ArrayLike) -> str:
    """Returns the SHA-256 hex digest of arrays in canonical form.

    Args:
        *arrays: NumPy arrays, or anything ``numpy.asarray`` accepts (lists, CPU tensors); order matters.

    Raises:
        TypeError: If an array is not numeric or boolean (object and string arrays have no canonical bytes).
    """
    hasher = hashlib.sha256(_DOMAIN)
    for value in arrays:
        array = np.asarray(value)
        if array.dtype.kind not in "biufc":
            raise TypeError(f"cannot fingerprint an array of dtype {array.dtype}")
        canonical = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))
        header = json.dumps({"dtype": canonical.dtype.str, "shape": list(canonical.shape)}, separators=(",", ":"))
        hasher.update(header.encode() + b"\n")
        # A uint8 view hashes the buffer in place: datasets can be hundreds of MB.
        hasher.update(canonical.reshape(-1).view(np.uint8).data)
    return hasher.hexdigest()


def fingerprint_bytes(data: bytes) -> str:
    """Returns the plain SHA-256 hex digest of ``data``: for a file, what ``sha256sum`` prints."""
    return hashlib.sha256(data).hexdigest()
