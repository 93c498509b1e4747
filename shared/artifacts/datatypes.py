"""KServe v2 tensor datatypes, safetensors dtypes and their torch / numpy equivalents.

Kept free of any service code so that clients, the registry and the inference servers agree on one
table instead of each keeping a private copy.
"""

from __future__ import annotations

import numpy as np
import torch

from shared.artifacts.errors import ArtifactError

__all__ = [
    "DATATYPES",
    "MODEL_DTYPES",
    "SAFETENSORS_DTYPES",
    "SAFETENSORS_DTYPE_SIZES",
    "datatype_size",
    "datatype_to_numpy",
    "datatype_to_safetensors",
    "datatype_to_torch",
    "numpy_to_datatype",
    "safetensors_to_torch",
    "torch_to_datatype",
    "torch_to_safetensors",
]

#: KServe v2 datatype strings, in the order the protocol document lists them.
DATATYPES: tuple[str, ...] = (
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "BF16", "FP32", "FP64", "BYTES",
)  # fmt: skip

_TORCH: dict[str, torch.dtype | None] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "UINT16": torch.uint16,
    "UINT32": torch.uint32,
    "UINT64": torch.uint64,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
    "FP32": torch.float32,
    "FP64": torch.float64,
    # Variable-length byte strings have no tensor representation in torch.
    "BYTES": None,
}

_NUMPY: dict[str, np.dtype | None] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    # numpy has no bfloat16; callers must go through torch or raw bytes.
    "BF16": None,
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    # Matches tritonclient, which carries BYTES tensors as object arrays of ``bytes``.
    "BYTES": np.dtype(object),
}

_SIZES: dict[str, int | None] = {
    "BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8,
    "INT8": 1, "INT16": 2, "INT32": 4, "INT64": 8,
    "FP16": 2, "BF16": 2, "FP32": 4, "FP64": 8,
    "BYTES": None,
}  # fmt: skip

#: Element size in bytes of every safetensors dtype this package accepts. The FP8 and 4-bit dtypes
#: newer safetensors releases know are left out on purpose: no artifact we write uses them, so a file
#: containing them is rejected rather than half-supported.
SAFETENSORS_DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8,
    "F16": 2, "BF16": 2, "F32": 4, "F64": 8,
}  # fmt: skip

SAFETENSORS_DTYPES: tuple[str, ...] = tuple(SAFETENSORS_DTYPE_SIZES)

_SAFETENSORS_TO_DATATYPE: dict[str, str] = {
    "BOOL": "BOOL", "U8": "UINT8", "I8": "INT8", "I16": "INT16", "U16": "UINT16", "I32": "INT32",
    "U32": "UINT32", "I64": "INT64", "U64": "UINT64", "F16": "FP16", "BF16": "BF16", "F32": "FP32",
    "F64": "FP64",
}  # fmt: skip
_DATATYPE_TO_SAFETENSORS: dict[str, str] = {v: k for k, v in _SAFETENSORS_TO_DATATYPE.items()}
_TORCH_TO_DATATYPE: dict[torch.dtype, str] = {v: k for k, v in _TORCH.items() if v is not None}

#: Model compute dtypes a manifest may declare, by their manifest spelling.
MODEL_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _check_datatype(datatype: str) -> str:
    if not isinstance(datatype, str) or datatype not in _SIZES:
        raise ArtifactError(f"unknown datatype {datatype!r} (known: {', '.join(DATATYPES)})")
    return datatype


def datatype_to_torch(datatype: str) -> torch.dtype | None:
    """Returns the torch dtype for a KServe datatype.

    Args:
        datatype: A KServe v2 datatype string such as ``"FP32"``.

    Returns:
        The torch dtype, or None for ``BYTES``, which torch cannot represent.

    Raises:
        ArtifactError: If ``datatype`` is not a KServe v2 datatype.
    """
    return _TORCH[_check_datatype(datatype)]


def torch_to_datatype(dtype: torch.dtype) -> str:
    """Returns the KServe datatype for a torch dtype.

    Raises:
        ArtifactError: If the dtype has no KServe equivalent (complex, float8, ...).
    """
    try:
        return _TORCH_TO_DATATYPE[dtype]
    except (KeyError, TypeError):
        raise ArtifactError(f"torch dtype {dtype} has no KServe v2 datatype") from None


def datatype_to_numpy(datatype: str) -> np.dtype | None:
    """Returns the numpy dtype for a KServe datatype: None for ``BF16``, object for ``BYTES``.

    Raises:
        ArtifactError: If ``datatype`` is not a KServe v2 datatype.
    """
    return _NUMPY[_check_datatype(datatype)]


def numpy_to_datatype(dtype: np.dtype | type) -> str:
    """Returns the KServe datatype for a numpy dtype (object and bytes arrays map to ``BYTES``).

    Raises:
        ArtifactError: If the dtype has no KServe equivalent.
    """
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ArtifactError(f"{dtype!r} is not a numpy dtype") from None
    # Fixed-width bytes arrays (dtype 'S') are how numpy users naturally spell byte strings.
    if dt.kind in ("O", "S"):
        return "BYTES"
    for name, candidate in _NUMPY.items():
        if candidate is not None and candidate == dt and name != "BYTES":
            return name
    raise ArtifactError(f"numpy dtype {dt} has no KServe v2 datatype")


def datatype_size(datatype: str) -> int | None:
    """Returns the element size in bytes of a KServe datatype, or None for variable-size ``BYTES``.

    Raises:
        ArtifactError: If ``datatype`` is not a KServe v2 datatype.
    """
    return _SIZES[_check_datatype(datatype)]


def datatype_to_safetensors(datatype: str) -> str | None:
    """Returns the safetensors dtype for a KServe datatype, or None for ``BYTES``.

    Raises:
        ArtifactError: If ``datatype`` is not a KServe v2 datatype.
    """
    return _DATATYPE_TO_SAFETENSORS.get(_check_datatype(datatype))


def safetensors_to_torch(dtype: str) -> torch.dtype:
    """Returns the torch dtype for a safetensors dtype string such as ``"F32"``.

    Raises:
        ArtifactError: If the dtype is not one this package accepts.
    """
    if dtype not in _SAFETENSORS_TO_DATATYPE:
        raise ArtifactError(f"unknown safetensors dtype {dtype!r} (known: {', '.join(SAFETENSORS_DTYPES)})")
    torch_dtype = _TORCH[_SAFETENSORS_TO_DATATYPE[dtype]]
    assert torch_dtype is not None  # every safetensors dtype is a fixed-size numeric type
    return torch_dtype


def torch_to_safetensors(dtype: torch.dtype) -> str:
    """Returns the safetensors dtype string for a torch dtype.

    Raises:
        ArtifactError: If safetensors (as accepted here) cannot store the dtype.
    """
    datatype = _TORCH_TO_DATATYPE.get(dtype)
    if datatype is None:
        raise ArtifactError(f"torch dtype {dtype} cannot be stored in an artifact")
    return _DATATYPE_TO_SAFETENSORS[datatype]
