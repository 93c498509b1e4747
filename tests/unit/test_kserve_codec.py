"""Unit tests of the KServe v2 tensor codec and conversions (shared/kserve)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inference import grpc_service_pb2 as pb
from maas.inference.v1 import worker_pb2

from shared.artifacts import Signature, TensorSpec
from shared.errors import InvalidArgument
from shared.kserve import codec, convert
from shared.kserve.batching import BatchingSettings

Tensor = pb.ModelInferRequest.InferInputTensor

NUMERIC = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]


def _sig(datatype: str = "FP32", shape: tuple[int, ...] = (-1, 4), name: str = "x") -> Signature:
    return Signature((TensorSpec(name, datatype, shape),), (TensorSpec("y", "FP32", (-1, 2)),))


def _array(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(0)
    if datatype == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    if datatype == "BYTES":
        out = np.empty(int(np.prod(shape)), dtype=object)
        out[:] = [f"item{i}".encode() * (i % 3) for i in range(out.size)]
        return out.reshape(shape)
    dtype = np.dtype(datatype.lower().replace("fp", "float").replace("uint", "uint").replace("int", "int"))
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


def _raw_request(name: str, datatype: str, array: np.ndarray) -> pb.ModelInferRequest:
    data = codec.encode_bytes(array) if datatype == "BYTES" else array.astype(array.dtype.newbyteorder("<")).tobytes()
    return pb.ModelInferRequest(
        model_name="m",
        inputs=[Tensor(name=name, datatype=datatype, shape=array.shape)],
        raw_input_contents=[data],
    )


def _typed_request(name: str, datatype: str, array: np.ndarray) -> pb.ModelInferRequest:
    tensor = Tensor(name=name, datatype=datatype, shape=array.shape)
    values = array.reshape(-1).tolist()
    getattr(tensor.contents, codec.TYPED_FIELDS[datatype]).extend(values)
    return pb.ModelInferRequest(model_name="m", inputs=[tensor])


@pytest.mark.parametrize("datatype", [*NUMERIC, "BYTES"])
def test_raw_round_trip(datatype: str) -> None:
    array = _array(datatype, (3, 4))
    request = _raw_request("x", datatype, array)
    assert codec.validate_request(request, _sig(datatype), 8) == 3
    decoded = codec.decode_inputs(request)["x"]
    assert decoded.shape == (3, 4)
    assert decoded.tolist() == array.tolist()
    response = codec.encode_response(request, "1", {"y": array})
    assert response.outputs[0].datatype == datatype
    assert list(response.outputs[0].shape) == [3, 4]
    assert response.raw_output_contents[0] == request.raw_input_contents[0]


@pytest.mark.parametrize("datatype", [d for d in [*NUMERIC, "BYTES"] if d != "FP16"])
def test_typed_round_trip(datatype: str) -> None:
    array = _array(datatype, (2, 4))
    request = _typed_request("x", datatype, array)
    assert codec.validate_request(request, _sig(datatype), 8) == 2
    decoded = codec.decode_inputs(request)["x"]
    assert decoded.tolist() == array.tolist()


def test_bf16_raw_only() -> None:
    values = torch.randn(2, 4).to(torch.bfloat16)
    data = values.view(torch.int16).numpy().tobytes()
    request = pb.ModelInferRequest(inputs=[Tensor(name="x", datatype="BF16", shape=[2, 4])], raw_input_contents=[data])
    assert codec.validate_request(request, _sig("BF16"), 8) == 2
    decoded = codec.bf16_to_torch(codec.decode_inputs(request)["x"])
    assert decoded.dtype == torch.bfloat16 and torch.equal(decoded, values)
    response = codec.encode_response(request, "1", {"y": values})
    assert response.outputs[0].datatype == "BF16" and response.raw_output_contents[0] == data
    typed = pb.ModelInferRequest(inputs=[Tensor(name="x", datatype="BF16", shape=[1, 4])])
    typed.inputs[0].contents.fp32_contents.extend([1.0] * 4)
    with pytest.raises(InvalidArgument, match="raw_input_contents"):
        codec.validate_request(typed, _sig("BF16"), 8)


def _fp32(shape: list[int], nbytes: int | None = None, name: str = "x") -> pb.ModelInferRequest:
    size = int(np.prod(shape)) * 4 if nbytes is None else nbytes
    return pb.ModelInferRequest(
        inputs=[Tensor(name=name, datatype="FP32", shape=shape)], raw_input_contents=[b"\0" * size]
    )


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (_fp32([2, 63]), r"input 'x': expected shape \[-1, 64\] \(batch first\), got \[2, 63\]"),
        (_fp32([2, 64], 100), r"input 'x': raw_input_contents holds 100 bytes, shape \[2, 64\] of FP32 needs 512"),
        (_fp32([2, 64, 1]), r"expected shape"),
        (_fp32([2, -64]), r"expected shape"),
        (_fp32([64, 64]), r"input 'x': batch 64 exceeds the maximum batch size 32"),
        (_fp32([0, 64]), r"input 'x': batch 0"),
        (pb.ModelInferRequest(), r"missing input 'x'"),
        (_fp32([2, 64], name="y"), r"unexpected input 'y' \(the model takes: x\)"),
    ],
)
def test_bad_fp32_requests(request_: pb.ModelInferRequest, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        codec.validate_request(request_, _sig(shape=(-1, 64)), 32)


def test_wrong_datatype() -> None:
    request = _raw_request("x", "INT64", np.zeros((1, 64), np.int64))
    with pytest.raises(InvalidArgument, match="input 'x': expected datatype FP32, got INT64"):
        codec.validate_request(request, _sig(shape=(-1, 64)), 32)


def test_malformed_bytes() -> None:
    good = b"".join(struct.pack("<I", 1) + b"a" for _ in range(3))
    request = pb.ModelInferRequest(
        inputs=[Tensor(name="text", datatype="BYTES", shape=[1, 4])],
        raw_input_contents=[good + struct.pack("<I", 999) + b"abc"],
    )
    with pytest.raises(InvalidArgument, match="input 'text': malformed BYTES element 3: length prefix 999 runs past"):
        codec.validate_request(request, _sig("BYTES", name="text"), 8)
    request.raw_input_contents[0] = good + b"\1\0"
    with pytest.raises(InvalidArgument, match="malformed BYTES element 3"):
        codec.validate_request(request, _sig("BYTES", name="text"), 8)
    request.raw_input_contents[0] = good
    with pytest.raises(InvalidArgument, match="holds 3 BYTES elements"):
        codec.validate_request(request, _sig("BYTES", name="text"), 8)


def test_mixed_raw_and_typed() -> None:
    sig = Signature(
        (TensorSpec("a", "FP32", (-1, 1)), TensorSpec("b", "FP32", (-1, 1))), (TensorSpec("y", "FP32", (-1,)),)
    )
    request = pb.ModelInferRequest(
        inputs=[Tensor(name="a", datatype="FP32", shape=[1, 1]), Tensor(name="b", datatype="FP32", shape=[1, 1])],
        raw_input_contents=[b"\0" * 4, b"\0" * 4],
    )
    assert codec.validate_request(request, sig, 4) == 1
    request.inputs[1].contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidArgument, match="input 'b': typed contents and raw_input_contents are mixed"):
        codec.validate_request(request, sig, 4)
    del request.raw_input_contents[1]
    with pytest.raises(InvalidArgument, match="raw_input_contents holds 1 tensors"):
        codec.validate_request(request, sig, 4)
    request.inputs[1].shape[0] = 2
    request.raw_input_contents.append(b"\0" * 8)
    request.inputs[1].ClearField("contents")
    with pytest.raises(InvalidArgument, match="input 'b': batch 2 differs from batch 1 of 'a'"):
        codec.validate_request(request, sig, 4)


def test_typed_wrong_field_and_count() -> None:
    request = _typed_request("x", "FP32", np.zeros((1, 4), np.float32))
    request.inputs[0].contents.fp32_contents.pop()
    with pytest.raises(InvalidArgument, match=r"contents.fp32_contents holds 3 elements, the shape needs 4"):
        codec.validate_request(request, _sig(), 8)
    request.inputs[0].contents.ClearField("fp32_contents")
    request.inputs[0].contents.int_contents.extend([1, 2, 3, 4])
    with pytest.raises(InvalidArgument, match=r"belongs in contents.fp32_contents, got int_contents"):
        codec.validate_request(request, _sig(), 8)
    request.inputs[0].contents.ClearField("int_contents")
    with pytest.raises(InvalidArgument, match="input 'x': no data"):
        codec.validate_request(request, _sig(), 8)


def test_typed_int8_out_of_range_decodes_to_invalid_argument() -> None:
    request = _typed_request("x", "INT8", np.zeros((1, 4), np.int8))
    request.inputs[0].contents.int_contents[0] = 300
    codec.validate_request(request, _sig("INT8"), 8)
    with pytest.raises(InvalidArgument, match="does not fit INT8"):
        codec.decode_inputs(request)


def test_requested_outputs() -> None:
    request = _fp32([1, 4])
    request.outputs.add(name="nope")
    with pytest.raises(InvalidArgument, match="unknown requested output 'nope' \\(the model returns: y\\)"):
        codec.validate_request(request, _sig(), 8)
    sig = Signature(
        (TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("a", "FP32", (-1,)), TensorSpec("b", "INT64", (-1,)))
    )
    request = _fp32([1, 4])
    request.outputs.add(name="b")
    request.outputs.add(name="a")
    assert codec.validate_request(request, sig, 8) == 1
    outputs = {"a": np.zeros(1, np.float32), "b": np.ones(1, np.int64)}
    response = codec.encode_response(request, "7", outputs)
    assert [o.name for o in response.outputs] == ["b", "a"] and response.model_version == "7"
    assert [o.name for o in codec.encode_response(_fp32([1, 4]), "7", outputs).outputs] == ["a", "b"]
    assert [o.name for o in codec.encode_response(request, "7", outputs, ["a"]).outputs] == ["a"]


def test_unbatched_model_returns_one() -> None:
    assert codec.validate_request(_fp32([5, 4]), _sig(shape=(5, 4)), 0) == 1


def test_request_parameters() -> None:
    request = pb.ModelInferRequest()
    request.parameters["priority"].uint64_param = 2
    request.parameters["timeout"].int64_param = 500
    request.parameters["flag"].bool_param = True
    request.parameters["name"].string_param = "s"
    request.parameters["ratio"].double_param = 0.5
    request.parameters["unset"].CopyFrom(pb.InferParameter())
    assert codec.request_parameters(request) == {
        "priority": 2,
        "timeout": 500,
        "flag": True,
        "name": "s",
        "ratio": 0.5,
    }


def test_convert_round_trips() -> None:
    sig = _sig()
    assert convert.signature_from_pb(convert.signature_to_pb(sig)) == sig
    resolved = convert.batching_from_pb(worker_pb2.BatchingConfig())
    assert resolved == BatchingSettings(32, 2000, (), 0, 1024)
    explicit = BatchingSettings(8, 100, (4, 2), 50, 10)
    assert explicit.preferred_batch_sizes == (2, 4)
    assert convert.batching_from_pb(convert.batching_to_pb(explicit)) == explicit
    with pytest.raises(InvalidArgument):
        BatchingSettings(4, 100, (8,), 0, 10)
    config = convert.model_config_pb("m", sig, explicit, 2, streaming=False)
    assert config.max_batch_size == 8 and list(config.input[0].dims) == [4]
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert config.instance_group[0].count == 2 and not config.model_transaction_policy.decoupled
    streaming = convert.model_config_pb("lm", sig, explicit, 1, streaming=True)
    assert streaming.model_transaction_policy.decoupled and streaming.max_batch_size == 1
    assert not streaming.HasField("dynamic_batching")
    metadata = convert.model_metadata_pb("m", [1, 2], sig)
    assert list(metadata.versions) == ["1", "2"] and list(metadata.inputs[0].shape) == [-1, 4]


# --- fuzzing: whatever the client sends, validation raises InvalidArgument or accepts -------------------

_DATATYPES = [*NUMERIC, "BF16", "BYTES"]
_FIELDS = list(codec.TYPED_FIELDS.values())


@st.composite
def _requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(
            name=draw(st.sampled_from(["x", "y", "text", ""])),
            datatype=draw(st.sampled_from([*_DATATYPES, "FP8", ""])),
            shape=draw(st.lists(st.integers(-2, 2**40), max_size=4)),
        )
        if draw(st.booleans()):
            field = draw(st.sampled_from(_FIELDS))
            if field == "bytes_contents":
                values: list = draw(st.lists(st.binary(max_size=4), max_size=8))
            elif field == "bool_contents":
                values = draw(st.lists(st.booleans(), max_size=8))
            elif field in ("fp32_contents", "fp64_contents"):
                values = draw(st.lists(st.floats(width=32), max_size=8))
            else:
                lo = -(2**31) if field == "int_contents" else -(2**63) if field == "int64_contents" else 0
                hi = {"uint64_contents": 2**64 - 1, "uint_contents": 2**32 - 1, "int64_contents": 2**63 - 1}.get(
                    field, 2**31 - 1
                )
                values = draw(st.lists(st.integers(lo, hi), max_size=8))
            getattr(tensor.contents, field).extend(values)
    if draw(st.booleans()):
        request.raw_input_contents.extend(draw(st.lists(st.binary(max_size=64), max_size=4)))
    for name in draw(st.lists(st.sampled_from(["y", "z"]), max_size=2)):
        request.outputs.add(name=name)
    return request


_FUZZ_SIGNATURES = [
    _sig(shape=(-1, 4)),
    _sig("BYTES", (-1, 2), "text"),
    _sig("BF16", (-1, -1)),
    Signature((TensorSpec("x", "INT64", (-1, 2)), TensorSpec("y", "BOOL", (-1,))), (TensorSpec("y", "FP32", (-1,)),)),
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=_requests(), which=st.integers(0, len(_FUZZ_SIGNATURES) - 1), max_batch=st.sampled_from([0, 1, 4]))
def test_fuzz_only_invalid_argument(request: pb.ModelInferRequest, which: int, max_batch: int) -> None:
    signature = _FUZZ_SIGNATURES[which]
    try:
        batch = codec.validate_request(request, signature, max_batch)
    except InvalidArgument:
        return
    assert batch >= 1
    try:
        decoded = codec.decode_inputs(request)
    except InvalidArgument:
        return
    assert set(decoded) == {s.name for s in signature.inputs}


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64), flip=st.integers(0, 63), count=st.integers(1, 8))
def test_fuzz_mutated_bytes(data: bytes, flip: int, count: int) -> None:
    array = np.empty(count, dtype=object)
    array[:] = [data[i:] for i in range(count)]
    raw = bytearray(codec.encode_bytes(array))
    if raw:
        raw[flip % len(raw)] ^= 0xFF
    request = pb.ModelInferRequest(
        inputs=[Tensor(name="text", datatype="BYTES", shape=[1, count])], raw_input_contents=[bytes(raw)]
    )
    try:
        codec.validate_request(request, _sig("BYTES", (-1, -1), "text"), 4)
    except InvalidArgument:
        return
    assert codec.decode_inputs(request)["text"].shape == (1, count)
