"""The wire format of an encoded gradient and the raw tensor <-> bytes helpers it is built from.

Everything here is plain bytes in little-endian order (never pickle), so an :class:`Encoded` can travel
in protobuf ``bytes`` fields and be decoded by a shard that trusts nothing about its sender.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "DTYPES",
    "MAX_NDIM",
    "MAX_NUMEL",
    "Encoded",
    "EncodingError",
    "check_shape",
    "dtype_name",
    "tensor_from_bytes",
    "tensor_to_bytes",
]

#: Largest element count any codec accepts: top-k indices travel as int32, and one bound for every codec
#: keeps a forged ``shape`` from making a shard allocate an unbounded dense tensor.
MAX_NUMEL = 2**31 - 1

#: Most dimensions a shape may have; real parameters have a handful, and the bound keeps validation cheap.
MAX_NDIM = 32

#: dtype name -> (torch dtype, little-endian numpy dtype of the bytes on the wire). bfloat16 travels as
#: its raw 16 bits because numpy has no bfloat16.
DTYPES: Mapping[str, tuple[torch.dtype, np.dtype]] = {
    "float64": (torch.float64, np.dtype("<f8")),
    "float32": (torch.float32, np.dtype("<f4")),
    "float16": (torch.float16, np.dtype("<f2")),
    "bfloat16": (torch.bfloat16, np.dtype("<i2")),
    "int64": (torch.int64, np.dtype("<i8")),
    "int32": (torch.int32, np.dtype("<i4")),
    "int16": (torch.int16, np.dtype("<i2")),
    "int8": (torch.int8, np.dtype("i1")),
    "uint8": (torch.uint8, np.dtype("u1")),
}

_NAMES: dict[torch.dtype, str] = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}


class EncodingError(ValueError):
    """An :class:`Encoded` (or a raw tensor buffer) is malformed.

    A ``ValueError`` because the cause is always bad input from a worker; the parameter server maps it to
    ``INVALID_ARGUMENT`` and can show the message verbatim.
    """


@dataclass(frozen=True, slots=True)
class Encoded:
    """One encoded tensor as it travels between a worker and a shard.

    Attributes:
        codec: Name of the codec that produced it (a key of ``CODECS``); ``decode`` dispatches on it.
        shape: Shape of the dense tensor it decodes to; ``()`` for a scalar.
        payload: Named raw little-endian tensor buffers; their sizes must agree with ``shape``.
        meta: Small scalar parameters the decoder needs (for example the int8 bucket size).
    """

    codec: str
    shape: tuple[int, ...]
    payload: dict[str, bytes] = field(default_factory=dict)
    meta: dict[str, float | int] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Total payload bytes: what goes on the wire, for bytes-per-step accounting (meta is negligible)."""
        return sum(len(buffer) for buffer in self.payload.values())


def dtype_name(dtype: torch.dtype) -> str:
    """Returns the wire name (for example ``"float32"``) of a supported torch dtype.

    Raises:
        ValueError: The dtype has no wire representation.
    """
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype}; supported: {', '.join(DTYPES)}") from None


def _wire_dtypes(dtype: str) -> tuple[torch.dtype, np.dtype]:
    entry = DTYPES.get(dtype) if isinstance(dtype, str) else None
    if entry is None:
        raise EncodingError(f"unknown dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    return entry


def check_shape(shape: object) -> tuple[int, ...]:
    """Validates a shape received from an untrusted peer and returns it as a tuple.

    Args:
        shape: A tuple or list of non-negative ints (protobuf repeated fields arrive as sequences).

    Returns:
        The shape as a tuple of ints.

    Raises:
        EncodingError: Not a sequence of ints, a negative dimension, too many dimensions or elements.
    """
    if not isinstance(shape, tuple | list):
        raise EncodingError(f"shape must be a tuple of ints, got {type(shape).__name__}")
    # bool is an int subclass, but True as a dimension is certainly a bug on the sender's side.
    if not all(isinstance(dim, int) and not isinstance(dim, bool) for dim in shape):
        raise EncodingError(f"shape must contain only ints, got {shape!r}")
    if len(shape) > MAX_NDIM:
        raise EncodingError(f"shape has {len(shape)} dimensions, at most {MAX_NDIM} are allowed")
    if any(dim < 0 for dim in shape):
        raise EncodingError(f"shape {tuple(shape)} has a negative dimension")
    numel = math.prod(shape)
    if numel > MAX_NUMEL:
        raise EncodingError(f"shape {tuple(shape)} has {numel} elements, at most {MAX_NUMEL} are allowed")
    return tuple(shape)


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    """Serialises a tensor to raw little-endian bytes in C (row-major) order.

    A CUDA tensor is copied to the host: the bytes have to exist there, and that copy is the only sync.

    Args:
        t: Tensor of a dtype in :data:`DTYPES`; any layout of strides, any device.

    Returns:
        ``t.numel() * itemsize`` bytes.

    Raises:
        ValueError: Unsupported dtype.
    """
    name = dtype_name(t.dtype)
    wire = DTYPES[name][1]
    t = t.detach()
    if t.dtype == torch.bfloat16:
        # numpy has no bfloat16: reinterpret the same 16 bits as int16 (a view, no conversion).
        t = t.view(torch.int16)
    array = t.cpu().numpy()
    # astype is a no-op on little-endian hosts and byte-swaps on big-endian ones.
    return array.astype(wire, copy=False).tobytes()


def tensor_from_bytes(b: bytes | bytearray | memoryview, dtype: str, shape: Sequence[int]) -> torch.Tensor:
    """Parses raw little-endian bytes written by :func:`tensor_to_bytes` into a new CPU tensor.

    Args:
        b: The raw buffer.
        dtype: Wire name of the element type, a key of :data:`DTYPES` (for example ``"bfloat16"``).
        shape: Shape of the tensor; ``()`` for a scalar.

    Returns:
        A writable tensor that owns its memory (the buffer is copied, so it may be reused afterwards).

    Raises:
        EncodingError: Unknown dtype, invalid shape, or a buffer size that disagrees with the shape.
    """
    torch_dtype, wire = _wire_dtypes(dtype)
    dims = check_shape(tuple(shape) if isinstance(shape, Sequence) else shape)
    numel = math.prod(dims)
    if not isinstance(b, bytes | bytearray | memoryview):
        raise EncodingError(f"expected a bytes buffer, got {type(b).__name__}")
    # len() of a memoryview counts its items, not its bytes.
    size = b.nbytes if isinstance(b, memoryview) else len(b)
    if size != numel * wire.itemsize:
        raise EncodingError(f"buffer has {size} bytes, expected {numel * wire.itemsize} for {dtype} of shape {dims}")
    # frombuffer is a read-only view of the caller's bytes; astype copies into native order and owns it.
    array = np.frombuffer(b, dtype=wire, count=numel).astype(wire.newbyteorder("="))
    tensor = torch.from_numpy(array)
    if torch_dtype == torch.bfloat16:
        tensor = tensor.view(torch.bfloat16)
    return tensor.reshape(dims)
