"""Tests for manifests, signatures and datatype tables (shared.artifacts.manifest / datatypes)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from shared.artifacts import (
    DATATYPES,
    SAFETENSORS_DTYPE_SIZES,
    ArtifactError,
    Manifest,
    Signature,
    TensorSpec,
    datatype_size,
    datatype_to_numpy,
    datatype_to_safetensors,
    datatype_to_torch,
    numpy_to_datatype,
    safetensors_to_torch,
    torch_to_datatype,
    torch_to_safetensors,
)

TINY_MLP = {"in_features": 4, "hidden": [3], "out_features": 2}


def _doc(**changes: object) -> dict:
    doc = json.loads(Manifest.for_model("mlp", TINY_MLP).to_json())
    doc.update(changes)
    return doc


def _rejects(doc: object, match: str) -> None:
    text = doc if isinstance(doc, (str, bytes)) else json.dumps(doc)
    with pytest.raises(ArtifactError, match=match):
        Manifest.from_json(text)


def test_for_model_fills_defaults_and_signature():
    manifest = Manifest.for_model("mlp", {"in_features": 4})
    assert manifest.arguments == {
        "in_features": 4,
        "hidden": [512, 512],
        "out_features": 10,
        "activation": "relu",
    }
    assert manifest.signature == Signature(
        inputs=(TensorSpec("input", "FP32", (-1, 4)),), outputs=(TensorSpec("logits", "FP32", (-1, 10)),)
    )
    assert (manifest.dtype, manifest.framework, manifest.format_version, manifest.quantization) == (
        "float32",
        "pytorch",
        1,
        None,
    )


def test_json_round_trip_is_canonical():
    manifest = Manifest.for_model("decoder-lm", {"depth": 1}, dtype="bfloat16")
    text = manifest.to_json()
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    again = Manifest.from_json(text.encode())
    assert again == manifest and again.to_json() == text
    assert hash(again) == hash(manifest)


def test_from_json_accepts_partial_arguments_and_optional_keys():
    doc = _doc()
    del doc["dtype"], doc["framework"], doc["quantization"]
    doc["arguments"] = {"in_features": 4, "hidden": [3], "out_features": 2}
    manifest = Manifest.from_json(json.dumps(doc))
    assert manifest.arguments["activation"] == "relu" and manifest.dtype == "float32"


def test_rejects_not_json_and_not_object():
    _rejects("{not json", r"manifest: not valid JSON \(")
    _rejects(b"\xff", "manifest: not valid UTF-8")
    _rejects("[1, 2]", "manifest: must be a JSON object, got list")
    _rejects('{"a": NaN}', "NaN is not valid JSON")
    _rejects('{"architecture": "mlp", "architecture": "cnn"}', "appears more than once")


def test_rejects_unknown_architecture_with_known_list():
    _rejects(
        _doc(architecture="foo"),
        r"^manifest: unknown architecture 'foo' \(known: cnn, decoder-lm, lstm-classifier, mlp, "
        r"transformer-classifier\)$",
    )


def test_rejects_missing_and_unknown_keys():
    doc = _doc()
    del doc["signature"]
    _rejects(doc, "missing required key.*'signature'")
    _rejects(_doc(extra=1), "unknown key.*'extra'")


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"architecture": 3}, "'architecture' must be a string"),
        ({"arguments": [1]}, "'arguments' must be an object"),
        ({"format_version": "1"}, "'format_version' must be an integer"),
        ({"format_version": True}, "'format_version' must be an integer"),
        ({"format_version": 2}, "unsupported format_version 2"),
        ({"framework": "jax"}, "unsupported framework 'jax'"),
        ({"dtype": "float64"}, r"unsupported dtype 'float64' \(supported: float32, float16, bfloat16\)"),
        ({"dtype": 32}, "'dtype' must be a string"),
        ({"quantization": "int4"}, "unsupported quantization 'int4'"),
        ({"quantization": 8}, "'quantization' must be a string or null"),
        ({"quantization": "int8-weight-only", "dtype": "float16"}, "requires dtype 'float32'"),
    ],
)
def test_rejects_bad_fields(changes, match):
    _rejects(_doc(**changes), match)


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        ({"in_features": 0}, r"argument 'in_features' must be an integer in \[1, "),
        ({"in_features": 4.0}, "argument 'in_features' must be an integer"),
        ({"in_features": True}, "argument 'in_features' must be an integer"),
        ({"hidden": "512"}, "argument 'hidden' must be a list"),
        ({"hidden": [3, -1]}, "argument 'hidden' must be a list"),
        ({"activation": "swish"}, "argument 'activation' must be one of relu, gelu, tanh, silu"),
        ({"bogus": 1}, r"unknown argument 'bogus' for architecture 'mlp' \(known: activation, hidden"),
    ],
)
def test_rejects_bad_arguments(arguments, match):
    with pytest.raises(ArtifactError, match="^manifest: .*" + match):
        Manifest.for_model("mlp", arguments)
    doc = _doc(arguments={**TINY_MLP, **arguments})
    _rejects(doc, match)


def test_rejects_arguments_the_architecture_cannot_combine():
    with pytest.raises(ArtifactError, match="width 30 is not divisible by heads 4"):
        Manifest.for_model("decoder-lm", {"width": 30, "heads": 4})
    with pytest.raises(ArtifactError, match="image_size 4 is too small for 3 pooling stages"):
        Manifest.for_model("cnn", {"image_size": 4, "channels": [1, 1, 1]})


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"name": "x", "datatype": "FP33", "shape": [1]}, "unknown datatype 'FP33'"),
        ({"name": "x", "datatype": "FP32", "shape": [0]}, "dimension 0"),
        ({"name": "x", "datatype": "FP32", "shape": [-2]}, "dimension -2"),
        ({"name": "x", "datatype": "FP32", "shape": [1.5]}, "dimension 1.5"),
        ({"name": "x", "datatype": "FP32", "shape": "1"}, "shape must be a list"),
        ({"name": "", "datatype": "FP32", "shape": [1]}, "non-empty string"),
        ({"name": "x", "datatype": "FP32"}, "missing shape"),
        ({"name": "x", "datatype": "FP32", "shape": [1], "dims": 1}, "unknown dims"),
    ],
)
def test_rejects_bad_tensor_specs(spec, match):
    doc = _doc()
    doc["signature"]["inputs"][0] = spec
    _rejects(doc, "manifest: signature.inputs\\[0\\].*" + match)


def test_rejects_signature_that_disagrees_with_zoo():
    doc = _doc()
    doc["signature"]["inputs"][0]["shape"] = [-1, 5]
    _rejects(doc, r"does not match architecture 'mlp' .* which has inputs \(input FP32 \[-1, 4\]\)")
    doc = _doc()
    doc["signature"]["outputs"] = []
    _rejects(doc, "declares no outputs")


def test_dataclass_construction_validates_too():
    manifest = Manifest.for_model("mlp", TINY_MLP)
    with pytest.raises(ArtifactError, match="unsupported dtype"):
        dataclasses.replace(manifest, dtype="int8")
    with pytest.raises(ArtifactError, match="unknown architecture"):
        dataclasses.replace(manifest, architecture="nope")
    assert dataclasses.replace(manifest, dtype="float16").dtype == "float16"


def test_datatype_tables_are_consistent():
    assert len(DATATYPES) == 14
    for datatype in DATATYPES:
        torch_dtype, np_dtype, size = (
            datatype_to_torch(datatype),
            datatype_to_numpy(datatype),
            datatype_size(datatype),
        )
        if torch_dtype is not None:
            assert torch_to_datatype(torch_dtype) == datatype
            assert torch.empty((), dtype=torch_dtype).element_size() == size
            st = datatype_to_safetensors(datatype)
            assert safetensors_to_torch(st) == torch_dtype and torch_to_safetensors(torch_dtype) == st
            assert SAFETENSORS_DTYPE_SIZES[st] == size
        if np_dtype is not None and datatype != "BYTES":
            assert numpy_to_datatype(np_dtype) == datatype and np_dtype.itemsize == size
    assert datatype_to_numpy("BF16") is None and datatype_to_torch("BYTES") is None
    assert datatype_size("BYTES") is None and numpy_to_datatype(np.dtype("S3")) == "BYTES"
    assert set(SAFETENSORS_DTYPE_SIZES) == {
        *("BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F16", "BF16", "F32", "F64")
    }


def test_datatype_errors():
    with pytest.raises(ArtifactError, match="unknown datatype 'FLOAT'"):
        datatype_size("FLOAT")
    with pytest.raises(ArtifactError, match="no KServe v2 datatype"):
        torch_to_datatype(torch.complex64)
    with pytest.raises(ArtifactError, match="unknown safetensors dtype"):
        safetensors_to_torch("F8_E5M2")


def test_numbers_beyond_the_digit_limit_are_artifact_errors() -> None:
    text = '{"architecture": "mlp", "arguments": {"in_features": ' + "9" * 5000 + "}}"
    with pytest.raises(ArtifactError, match="too long"):
        Manifest.from_json(text)
