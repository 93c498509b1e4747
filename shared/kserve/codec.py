"""KServe v2 tensor codec: request validation, tensor decoding and response encoding.

``validate_request`` runs in the gateway on every request, so it only does length arithmetic (and a walk
over the length prefixes of BYTES tensors): it never decodes float data. ``decode_inputs`` turns a validated
request into numpy arrays; ``encode_response`` writes outputs as ``raw_output_contents``.

Datatypes follow Triton: typed ``contents`` use ``bool_contents`` (BOOL), ``int_contents`` (INT8/16/32),
``int64_contents``, ``uint_contents`` (UINT8/16/32), ``uint64_contents``, ``fp32_contents``,
``fp64_contents`` and ``bytes_contents`` (BYTES); FP16 and BF16 travel only raw. Raw tensors are
little-endian; a BYTES element is a 4-byte little-endian length followed by that many bytes. numpy has no
bfloat16, so BF16 tensors decode to ``uint16`` arrays of the raw bit patterns (:func:`bf16_to_torch` turns
them into ``torch.bfloat16``).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from inference import grpc_service_pb2

from shared.artifacts import Signature, TensorSpec, datatype_size, numpy_to_datatype, torch_to_datatype
from shared.artifacts.errors import ArtifactError
from shared.errors import InvalidArgument
from shared.kserve.tensors import bf16_to_torch

__all__ = [
    "TYPED_FIELDS",
    "bf16_to_torch",
    "decode_inputs",
    "encode_bytes",
    "encode_response",
    "mark_shared_output",
    "raw_output",
    "request_parameters",
    "validate_request",
    "write_raw_output",
]

#: The ``InferTensorContents`` field that carries each datatype; FP16 and BF16 have none (raw only).
TYPED_FIELDS: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

# Little-endian numpy dtypes of raw contents; BF16 is carried as its uint16 bit patterns.
_RAW_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}

_LENGTH = struct.Struct("<I")


def _fmt(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _bytes_count(data: bytes | memoryview, name: str, limit: int) -> int:
    """Counts the BYTES elements of raw contents, checking every length prefix; stops past ``limit``."""
    offset, count, end = 0, 0, len(data)
    while offset < end:
        if end - offset < 4:
            raise InvalidArgument(
                f"input '{name}': malformed BYTES element {count}: {end - offset} trailing bytes, "
                "a length prefix needs 4"
            )
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += 4
        if length > end - offset:
            raise InvalidArgument(
                f"input '{name}': malformed BYTES element {count}: length prefix {length} runs past the end"
            )
        offset += length
        count += 1
        if count > limit:
            break
    return count


def _check_shape(spec: TensorSpec, shape: Sequence[int], batched: bool) -> None:
    # Runs for every input of every request (twice per hop): the message is only built on failure.
    if len(shape) == len(spec.shape) and all(
        got >= 0 and (want == -1 or want == got) for want, got in zip(spec.shape, shape, strict=True)
    ):
        return
    expected = _fmt(spec.shape) + (" (batch first)" if batched else "")
    raise InvalidArgument(f"input '{spec.name}': expected shape {expected}, got {_fmt(shape)}")


def validate_request(
    request: grpc_service_pb2.ModelInferRequest,
    signature: Signature,
    max_batch_size: int,
    raw: Sequence[bytes | memoryview] | None = None,
) -> int:
    """Checks a request against a signature without decoding its data.

    Args:
        request: The client's request.
        signature: The served version's signature (shapes include the batch dimension).
        max_batch_size: The largest batch a request may carry; 0 when the model has no batch dimension.
        raw: Every input's raw contents in input order, in place of ``request.raw_input_contents`` (inputs
            read from shared memory).

    Returns:
        The request's batch size (the first dimension of its inputs), or 1 when ``max_batch_size`` is 0.

    Raises:
        InvalidArgument: On missing, unexpected or repeated inputs, wrong datatypes or shapes, contents that
            do not match the shapes, mixed raw and typed contents, or unknown requested outputs. The message
            names the input.
    """
    specs = {spec.name: spec for spec in signature.inputs}
    seen: set[str] = set()
    for tensor in request.inputs:
        if tensor.name in seen:
            raise InvalidArgument(f"input '{tensor.name}' is given more than once")
        if tensor.name not in specs:
            raise InvalidArgument(f"unexpected input '{tensor.name}' (the model takes: {', '.join(specs)})")
        seen.add(tensor.name)
    for name in specs:
        if name not in seen:
            raise InvalidArgument(f"missing input '{name}'")

    if raw is None:
        raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents holds {len(raw)} tensors but the request has {len(request.inputs)} inputs"
        )
    batched = max_batch_size > 0
    batch: int | None = None
    batch_from = ""
    for index, tensor in enumerate(request.inputs):
        spec = specs[tensor.name]
        name = spec.name
        if tensor.datatype != spec.datatype:
            raise InvalidArgument(f"input '{name}': expected datatype {spec.datatype}, got {tensor.datatype}")
        shape = tuple(tensor.shape)
        _check_shape(spec, shape, batched)
        if batched:
            if not shape:
                raise InvalidArgument(f"input '{name}': expected a batch dimension, got shape []")
            if shape[0] < 1:
                raise InvalidArgument(f"input '{name}': batch {shape[0]} is empty; at least 1 is needed")
            if shape[0] > max_batch_size:
                raise InvalidArgument(
                    f"input '{name}': batch {shape[0]} exceeds the maximum batch size {max_batch_size}"
                )
            if batch is None:
                batch, batch_from = shape[0], name
            elif shape[0] != batch:
                raise InvalidArgument(f"input '{name}': batch {shape[0]} differs from batch {batch} of '{batch_from}'")
        elements = 1
        for dim in shape:
            elements *= dim
        typed = tensor.HasField("contents") and bool(tensor.contents.ListFields())
        if raw:
            if typed:
                raise InvalidArgument(
                    f"input '{name}': typed contents and raw_input_contents are mixed; use one or the other"
                )
            _check_raw(name, spec.datatype, shape, elements, raw[index])
        else:
            _check_typed(name, spec.datatype, elements, tensor.contents if typed else None)

    names = {spec.name for spec in signature.outputs}
    wanted: set[str] = set()
    for output in request.outputs:
        if output.name not in names:
            returns = ", ".join(o.name for o in signature.outputs)
            raise InvalidArgument(f"unknown requested output '{output.name}' (the model returns: {returns})")
        if output.name in wanted:
            raise InvalidArgument(f"output '{output.name}' is requested more than once")
        wanted.add(output.name)
    return batch if batched and batch is not None else 1


def _check_raw(name: str, datatype: str, shape: Sequence[int], elements: int, data: bytes | memoryview) -> None:
    size = datatype_size(datatype)
    if size is None:
        count = _bytes_count(data, name, elements)
        if count != elements:
            held = str(count) if count <= elements else f"more than {elements}"
            raise InvalidArgument(
                f"input '{name}': raw_input_contents holds {held} BYTES elements, shape {_fmt(shape)} needs {elements}"
            )
        return
    if len(data) != elements * size:
        raise InvalidArgument(
            f"input '{name}': raw_input_contents holds {len(data)} bytes, "
            f"shape {_fmt(shape)} of {datatype} needs {elements * size}"
        )


def _check_typed(name: str, datatype: str, elements: int, contents: Any) -> None:
    field = TYPED_FIELDS.get(datatype)
    fields = [] if contents is None else contents.ListFields()
    if field is None:
        if elements or fields:
            raise InvalidArgument(f"input '{name}': {datatype} data must be sent in raw_input_contents")
        return
    if not fields:
        if elements:
            raise InvalidArgument(f"input '{name}': no data (set contents.{field} or raw_input_contents)")
        return
    if len(fields) != 1 or fields[0][0].name != field:
        given = ", ".join(f.name for f, _ in fields)
        raise InvalidArgument(f"input '{name}': {datatype} data belongs in contents.{field}, got {given}")
    count = len(fields[0][1])
    if count != elements:
        raise InvalidArgument(f"input '{name}': contents.{field} holds {count} elements, the shape needs {elements}")


_INT_RANGES: dict[str, tuple[int, int]] = {
    "INT8": (-(2**7), 2**7 - 1),
    "INT16": (-(2**15), 2**15 - 1),
    "UINT8": (0, 2**8 - 1),
    "UINT16": (0, 2**16 - 1),
}


def decode_inputs(
    request: grpc_service_pb2.ModelInferRequest, raw: Sequence[bytes | memoryview] | None = None
) -> dict[str, np.ndarray]:
    """Decodes the inputs of a validated request.

    Raw fixed-size tensors are zero-copy, read-only views of the message bytes (or of ``raw``, every
    input's raw contents in input order when given: inputs read from shared memory). BYTES tensors become
    object arrays of ``bytes``; BF16 tensors ``uint16`` arrays of their bit patterns.

    Raises:
        InvalidArgument: If a typed INT8/INT16/UINT8/UINT16 value does not fit its datatype.
    """
    out: dict[str, np.ndarray] = {}
    if raw is None:
        raw = request.raw_input_contents
    for index, tensor in enumerate(request.inputs):
        shape = tuple(tensor.shape)
        datatype = tensor.datatype
        if datatype == "BYTES":
            items = _split_bytes(raw[index]) if raw else list(tensor.contents.bytes_contents)
            array = np.empty(len(items), dtype=object)
            array[:] = items
            out[tensor.name] = array.reshape(shape)
        elif raw:
            out[tensor.name] = np.frombuffer(raw[index], dtype=_RAW_DTYPES[datatype]).reshape(shape)
        else:
            values = getattr(tensor.contents, TYPED_FIELDS[datatype])
            bounds = _INT_RANGES.get(datatype)
            if bounds is not None and len(values) and not bounds[0] <= min(values) <= max(values) <= bounds[1]:
                raise InvalidArgument(f"input '{tensor.name}': a value does not fit {datatype}")
            dtype = _RAW_DTYPES[datatype]
            out[tensor.name] = np.asarray(values, dtype=dtype.newbyteorder("=")).reshape(shape)
    return out


def _split_bytes(data: bytes | memoryview) -> list[bytes]:
    items, offset = [], 0
    view = memoryview(data)
    while offset < len(data):
        (length,) = _LENGTH.unpack_from(data, offset)
        items.append(bytes(view[offset + 4 : offset + 4 + length]))
        offset += 4 + length
    return items


def encode_bytes(values: np.ndarray) -> bytes:
    """Serializes an array of ``bytes`` (or ``str``, UTF-8 encoded) as raw BYTES contents."""
    parts: list[bytes] = []
    for item in values.reshape(-1):
        data = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def _raw_output(value: np.ndarray | torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        try:
            datatype = torch_to_datatype(tensor.dtype)
        except ArtifactError as exc:
            raise InvalidArgument(str(exc)) from None
        if tensor.dtype == torch.bfloat16:
            return datatype, tuple(tensor.shape), tensor.view(torch.int16).numpy().astype("<i2").tobytes()
        value = tensor.numpy()
    array = np.asarray(value)
    try:
        datatype = numpy_to_datatype(array.dtype)
    except ArtifactError as exc:
        raise InvalidArgument(str(exc)) from None
    if datatype == "BYTES":
        return datatype, array.shape, encode_bytes(array)
    return datatype, array.shape, np.ascontiguousarray(array, dtype=_RAW_DTYPES[datatype]).tobytes()


def raw_output(value: np.ndarray | torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    """An output tensor's KServe datatype, shape and raw contents.

    Raises:
        InvalidArgument: The tensor has no KServe datatype.
    """
    return _raw_output(value)


def write_raw_output(value: np.ndarray | torch.Tensor, into: memoryview, name: str) -> tuple[str, tuple[int, ...], int]:
    """Writes an output tensor's raw contents at the start of ``into`` (a shared-memory window) with one copy.

    Returns:
        The output's datatype, shape and the number of bytes written.

    Raises:
        InvalidArgument: The tensor has no KServe datatype, or does not fit ``into``.
    """
    array = value if isinstance(value, np.ndarray) else None
    datatype = None if array is None else _NUMPY_DATATYPES.get(array.dtype.str)
    if array is None or datatype is None:  # torch, BF16, BYTES, other byte orders: through the encoder
        datatype, shape, data = _raw_output(value)
        _fits(name, len(data), len(into))
        into[: len(data)] = data
        return datatype, tuple(shape), len(data)
    _fits(name, array.nbytes, len(into))
    np.copyto(np.ndarray(array.shape, dtype=array.dtype, buffer=into), array, casting="no")
    return datatype, array.shape, array.nbytes


def _fits(name: str, size: int, room: int) -> None:
    if size > room:
        raise InvalidArgument(
            f"output '{name}': {size} bytes do not fit its shared-memory window of {room} bytes "
            "(shared_memory_byte_size)"
        )


# Native little-endian numpy dtypes written to shared memory as they are (one memcpy).
_NUMPY_DATATYPES: dict[str, str] = {
    dtype.str: datatype for datatype, dtype in _RAW_DTYPES.items() if datatype != "BF16"
}


def mark_shared_output(
    output: grpc_service_pb2.ModelInferResponse.InferOutputTensor, region: str, byte_size: int, offset: int
) -> None:
    """Says in an output's parameters where its data was written (its raw contents stay empty, as Triton's)."""
    output.parameters["shared_memory_region"].string_param = region
    output.parameters["shared_memory_byte_size"].int64_param = byte_size
    if offset:
        output.parameters["shared_memory_offset"].int64_param = offset


def encode_response(
    request: grpc_service_pb2.ModelInferRequest,
    model_version: str,
    outputs: Mapping[str, np.ndarray | torch.Tensor],
    requested: Sequence[str] | None = None,
) -> grpc_service_pb2.ModelInferResponse:
    """Builds the response to ``request`` with outputs in ``raw_output_contents``.

    Args:
        request: The request answered (its model name and id are echoed).
        model_version: The concrete version that served it.
        outputs: Output tensors by name, in signature order (numpy arrays; torch tensors are accepted too,
            which is how BF16 outputs are given).
        requested: Output names to return, in order; None returns the request's requested outputs in its
            order, or every output when it requests none.

    Raises:
        InvalidArgument: If a requested output is missing from ``outputs`` or has no KServe datatype.
    """
    names = list(requested) if requested is not None else [o.name for o in request.outputs] or list(outputs)
    response = grpc_service_pb2.ModelInferResponse(
        model_name=request.model_name, model_version=model_version, id=request.id
    )
    for name in names:
        if name not in outputs:
            raise InvalidArgument(f"output '{name}' was not produced (produced: {', '.join(outputs)})")
        datatype, shape, data = _raw_output(outputs[name])
        response.outputs.add(name=name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(data)
    return response


def request_parameters(request: Any) -> dict[str, bool | int | float | str]:
    """Returns a request's (or tensor's) ``parameters`` map as plain Python values; unset entries are skipped."""
    params: dict[str, bool | int | float | str] = {}
    for key, param in request.parameters.items():
        choice = param.WhichOneof("parameter_choice")
        if choice is not None:
            params[key] = getattr(param, choice)
    return params
