"""Strict validation of safetensors headers, without torch and before any tensor is read.

The header of an uploaded artifact is untrusted: a header whose offsets disagree with its shapes, overlap,
leave gaps or point past the file is a "lying header" and is rejected here, so the loaders downstream
only ever see files whose layout has been checked.

File layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data region, which
the tensors' ``data_offsets`` (relative to the region start) must tile exactly.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import IO, Any

from shared.artifacts.datatypes import SAFETENSORS_DTYPE_SIZES
from shared.artifacts.errors import ArtifactError

__all__ = ["MAX_HEADER_BYTES", "METADATA_KEY", "read_header", "tensor_table", "validate_header"]

#: Same bound the safetensors library itself enforces; real headers are kilobytes.
MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"
_TENSOR_KEYS = frozenset({"dtype", "shape", "data_offsets"})


def _fail(detail: str) -> ArtifactError:
    return ArtifactError(f"safetensors header: {detail}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A repeated tensor name would let two readers disagree on which entry is real.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _fail(f"key {key!r} appears more than once")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise _fail(f"{name} is not valid JSON")


def read_header(fp_or_path: str | os.PathLike[str] | IO[bytes], file_size: int | None = None) -> tuple[dict, int]:
    """Reads and validates the header of a safetensors file.

    Args:
        fp_or_path: A path, or a binary file object positioned at the start of the artifact.
        file_size: Size of the whole artifact in bytes. Optional for paths and real files, where it is
            taken from the file system; required for other file objects (e.g. ``io.BytesIO``).

    Returns:
        ``(header, data_start)``: the decoded header (tensor entries plus optional ``__metadata__``)
        and the offset of the data region from the start of the artifact.

    Raises:
        ArtifactError: If the file is truncated or the header is malformed or lying.
    """
    if isinstance(fp_or_path, (str, os.PathLike)):
        with open(fp_or_path, "rb") as opened:
            return read_header(opened, os.fstat(opened.fileno()).st_size if file_size is None else file_size)
    fp = fp_or_path
    if file_size is None:
        try:
            file_size = os.fstat(fp.fileno()).st_size
        except (AttributeError, OSError, ValueError):
            raise ValueError("file_size is required when reading from a file object without a descriptor") from None
    if file_size < 8:
        raise _fail(f"file is {file_size} bytes, too short to hold the 8-byte header length")
    prefix = fp.read(8)
    if len(prefix) != 8:
        raise _fail(f"file ended after {len(prefix)} bytes, before the 8-byte header length")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len == 0:
        raise _fail("header length is 0")
    if header_len > MAX_HEADER_BYTES:
        raise _fail(f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + header_len > file_size:
        raise _fail(f"header length {header_len} runs past the end of the {file_size}-byte file")
    raw = fp.read(header_len)
    if len(raw) != header_len:
        raise _fail(f"file ended {len(raw)} bytes into the {header_len}-byte header")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=_object_without_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise _fail(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise _fail("JSON is nested too deeply") from None
    data_start = 8 + header_len
    validate_header(header, file_size, data_start)
    return header, data_start


def _check_entry(name: str, entry: object) -> tuple[int, int]:
    if not isinstance(entry, dict):
        raise _fail(f"tensor {name!r} must be an object, got {type(entry).__name__}")
    if set(entry) != _TENSOR_KEYS:
        raise _fail(
            f"tensor {name!r} must have exactly keys data_offsets, dtype, shape, got {', '.join(sorted(entry))}"
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in SAFETENSORS_DTYPE_SIZES:
        raise _fail(f"tensor {name!r} has unknown dtype {dtype!r} (known: {', '.join(SAFETENSORS_DTYPE_SIZES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _fail(f"tensor {name!r} shape {json.dumps(shape)} must be a list of integers >= 0")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _fail(f"tensor {name!r} data_offsets {json.dumps(offsets)} must be [begin, end] with 0 <= begin <= end")
    nbytes = math.prod(shape) * SAFETENSORS_DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise _fail(f"tensor {name!r} data_offsets {offsets} do not match shape {shape} of {dtype} ({nbytes} bytes)")
    return offsets[0], offsets[1]


def validate_header(header: object, file_size: int, data_start: int) -> None:
    """Checks a decoded header against the file it came from.

    Args:
        header: The decoded header JSON.
        file_size: Size of the whole artifact in bytes.
        data_start: Offset of the data region (8 + header length), as returned by :func:`read_header`.

    Raises:
        ArtifactError: If the metadata is not string-to-string, a tensor entry is malformed (unknown
            dtype, negative or non-integer dims, offsets disagreeing with shape and dtype), or the
            tensors overlap, leave gaps, or do not end exactly at the end of the file.
    """
    if not isinstance(header, dict):
        raise _fail(f"must be a JSON object, got {type(header).__name__}")
    data_size = file_size - data_start
    if data_size < 0:
        raise _fail(f"data region starts at byte {data_start}, past the end of the {file_size}-byte file")
    metadata = header.get(METADATA_KEY)
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise _fail(f"{METADATA_KEY} must map strings to strings")
    spans = sorted((*_check_entry(name, entry), name) for name, entry in header.items() if name != METADATA_KEY)
    position, previous = 0, None
    for begin, end, name in spans:
        if begin < position:
            raise _fail(f"tensor {name!r} bytes [{begin}, {end}] overlap tensor {previous!r} ending at {position}")
        if begin > position:
            after = f"after tensor {previous!r}" if previous is not None else "at the start of the data region"
            raise _fail(f"gap of {begin - position} bytes {after}, before tensor {name!r} at {begin}")
        position, previous = end, name
    if position != data_size:
        if position > data_size:
            raise _fail(f"tensor {previous!r} ends at byte {position}, past the {data_size}-byte data region")
        raise _fail(f"{data_size - position} bytes after the last tensor are not covered by any tensor")


def tensor_table(header: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Returns name -> (safetensors dtype, shape) for every tensor of a validated header."""
    return {name: (entry["dtype"], tuple(entry["shape"])) for name, entry in header.items() if name != METADATA_KEY}
