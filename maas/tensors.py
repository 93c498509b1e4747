"""numpy arrays (and torch tensors) to KServe v2 tensors and back, with numpy alone (public: for callers of
``infer_response``, which returns the raw KServe response).

``shared.artifacts`` has the same table but imports torch (seconds); an SDK call must not need torch
unless the caller passes a tensor.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
from inference import grpc_service_pb2 as kpb

from shared.errors import InvalidArgument

_NUMPY: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}
_DATATYPE = {np.dtype(v).str: k for k, v in _NUMPY.items()} | {np.dtype("bool").str: "BOOL"}
_LENGTH = struct.Struct("<I")


def to_numpy(value: Any) -> np.ndarray:
    """``value`` as a numpy array: a torch tensor is detached and copied to the CPU (bfloat16 widened to
    float32, which numpy lacks); anything else goes through ``np.asarray``."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        tensor = value.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":
            tensor = tensor.float()
        return np.asarray(tensor.numpy())
    return np.asarray(value)


def _encode_bytes(values: np.ndarray) -> bytes:
    parts: list[bytes] = []
    for item in values.reshape(-1):
        data = item.encode() if isinstance(item, str) else bytes(item)
        parts += [_LENGTH.pack(len(data)), data]
    return b"".join(parts)


def add_input(request: kpb.ModelInferRequest, name: str, value: Any, declared: str | None) -> None:
    """Append ``value`` to ``request`` as input ``name``, cast to the ``declared`` KServe datatype if known."""
    array = to_numpy(value)
    if declared == "BYTES" or (declared is None and array.dtype.kind in "OSU"):
        request.inputs.add(name=name, datatype="BYTES", shape=list(array.shape))
        request.raw_input_contents.append(_encode_bytes(array))
        return
    if declared is not None:
        if declared not in _NUMPY:
            raise InvalidArgument(f"input {name!r} has datatype {declared}, which the SDK cannot send")
        array = array.astype(_NUMPY[declared], copy=False)
    datatype = _DATATYPE.get(array.dtype.newbyteorder("<").str if array.dtype.byteorder == ">" else array.dtype.str)
    if datatype is None:
        raise InvalidArgument(f"input {name!r}: numpy dtype {array.dtype} has no KServe datatype")
    array = np.ascontiguousarray(array.astype(_NUMPY[datatype], copy=False))
    request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
    request.raw_input_contents.append(array.tobytes())


def decode_outputs(response: kpb.ModelInferResponse) -> dict[str, np.ndarray]:
    """The response's outputs as arrays (BF16 widened to float32, BYTES as an object array of ``bytes``)."""
    arrays: dict[str, np.ndarray] = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        shape = list(tensor.shape)
        if tensor.datatype == "BF16":
            array = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif tensor.datatype == "BYTES":
            items, offset = [], 0
            while offset < len(raw):
                (length,) = _LENGTH.unpack_from(raw, offset)
                items.append(raw[offset + 4 : offset + 4 + length])
                offset += 4 + length
            array = np.array(items, dtype=object)
        elif tensor.datatype in _NUMPY:
            array = np.frombuffer(raw, dtype=_NUMPY[tensor.datatype])
        else:
            raise InvalidArgument(f"output {tensor.name!r} has datatype {tensor.datatype}, not decodable here")
        arrays[tensor.name] = array.reshape(shape)
    return arrays


def named_inputs(inputs: Mapping[str, Any] | Any, names: list[str]) -> dict[str, Any]:
    """``inputs`` keyed by input name: a mapping as given, a single array as the model's only input."""
    if isinstance(inputs, Mapping):
        unknown = sorted(set(inputs) - set(names))
        if unknown:
            raise InvalidArgument(f"the model has no input {unknown[0]!r} (inputs: {', '.join(names)})")
        return dict(inputs)
    if len(names) != 1:
        raise InvalidArgument(f"the model takes inputs {', '.join(names)}: pass a dict of arrays by name")
    return {names[0]: inputs}
