"""Tests for strict safetensors header validation (shared.artifacts.safetensors_header)."""

from __future__ import annotations

import io
import json
import struct

import pytest
import safetensors.torch
import torch

from shared.artifacts import ArtifactError, Manifest, artifact_bytes, build_model, load_artifact
from shared.artifacts.safetensors_header import MAX_HEADER_BYTES, read_header, tensor_table, validate_header


def _file(header: object, data: bytes = b"", *, raw_header: bytes | None = None) -> bytes:
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def _read(blob: bytes) -> tuple[dict, int]:
    return read_header(io.BytesIO(blob), len(blob))


def _rejects(blob: bytes, match: str) -> None:
    with pytest.raises(ArtifactError, match=match):
        _read(blob)


def _two_tensors(a_offsets: list[int], b_offsets: list[int], data_len: int = 16) -> bytes:
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": a_offsets},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": b_offsets},
    }
    return _file(header, b"\0" * data_len)


def test_accepts_real_safetensors_file_from_bytes_and_path(tmp_path):
    tensors = {"w": torch.ones(3, 4), "i": torch.arange(5), "e": torch.zeros(0, 2)}
    blob = safetensors.torch.save(tensors, metadata={"k": "v"})
    header, data_start = _read(blob)
    assert header["__metadata__"] == {"k": "v"}
    assert data_start == 8 + struct.unpack("<Q", blob[:8])[0]
    assert tensor_table(header) == {"w": ("F32", (3, 4)), "i": ("I64", (5,)), "e": ("F32", (0, 2))}
    path = tmp_path / "x.safetensors"
    path.write_bytes(blob)
    assert read_header(path) == (header, data_start)
    with open(path, "rb") as fp:
        assert read_header(fp) == (header, data_start)


def test_accepts_real_artifact():
    manifest = Manifest.for_model("mlp", {"in_features": 4, "hidden": [3], "out_features": 2})
    header, _ = _read(artifact_bytes(build_model(manifest), manifest))
    assert set(tensor_table(header)) == {
        "layers.0.weight",
        "layers.0.bias",
        "layers.2.weight",
        "layers.2.bias",
    }


def test_accepts_header_with_only_metadata_and_no_tensors():
    header, _ = _read(_file({"__metadata__": {"a": "b"}}))
    assert tensor_table(header) == {}


def test_rejects_offsets_that_do_not_match_shape():
    header = {"fc1.weight": {"dtype": "F32", "shape": [10, 20], "data_offsets": [0, 100]}}
    _rejects(
        _file(header, b"\0" * 100),
        r"tensor 'fc1.weight' data_offsets \[0, 100\] do not match shape \[10, 20\] of F32 \(800 bytes\)",
    )


def test_rejects_overlapping_tensors():
    _rejects(_two_tensors([0, 8], [4, 12], data_len=12), "overlap")


def test_rejects_gap_between_tensors():
    _rejects(_two_tensors([0, 8], [12, 20], data_len=20), "gap of 4 bytes after tensor 'a'")


def test_rejects_gap_at_start_of_data():
    header = {"a": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}
    _rejects(_file(header, b"\0" * 8), "gap of 4 bytes at the start")


def test_rejects_uncovered_trailing_bytes():
    _rejects(_two_tensors([0, 8], [8, 16], data_len=20), "4 bytes after the last tensor")


def test_rejects_tensor_past_end_of_file():
    _rejects(_two_tensors([0, 8], [8, 16], data_len=12), "past the 12-byte data region")


def test_rejects_header_length_beyond_file():
    blob = _file({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0")
    _rejects(blob[:-5], "runs past the end")
    blob = struct.pack("<Q", 1 << 40) + b"{}"
    _rejects(blob, "exceeds the")


def test_rejects_bad_header_length():
    _rejects(b"\0" * 4, "too short")
    _rejects(struct.pack("<Q", 0) + b"{}", "header length is 0")
    _rejects(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", "exceeds")


def test_rejects_non_json_header():
    _rejects(_file(None, raw_header=b"not json"), "not valid JSON")
    _rejects(_file(None, raw_header=b"\xff\xfe{}"), "not valid UTF-8")
    _rejects(_file([1, 2]), "must be a JSON object")
    _rejects(_file(None, raw_header=b'{"a": NaN}'), "NaN is not valid JSON")


def test_rejects_unknown_dtype():
    header = {"a": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}
    _rejects(_file(header, b"\0"), "tensor 'a' has unknown dtype 'F8_E4M3'")


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}, "integers >= 0"),
        ({"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}, "integers >= 0"),
        ({"dtype": "U8", "shape": "1", "data_offsets": [0, 1]}, "integers >= 0"),
        ({"dtype": "U8", "shape": [1], "data_offsets": [1, 0]}, "begin <= end"),
        ({"dtype": "U8", "shape": [1], "data_offsets": [0]}, "begin <= end"),
        ({"dtype": "U8", "shape": [1], "data_offsets": [0, 1.0]}, "begin <= end"),
        ({"dtype": "U8", "shape": [1]}, "exactly keys"),
        ({"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "extra": 1}, "exactly keys"),
        ([1], "must be an object"),
    ],
)
def test_rejects_malformed_tensor_entries(entry, match):
    _rejects(_file({"a": entry}, b"\0"), match)


def test_rejects_bad_metadata_and_duplicate_keys():
    _rejects(_file({"__metadata__": {"a": 1}}), "__metadata__ must map strings to strings")
    _rejects(_file({"__metadata__": "x"}), "__metadata__ must map strings to strings")
    entry = '{"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}'
    _rejects(_file(None, b"\0", raw_header=f'{{"a": {entry}, "a": {entry}}}'.encode()), "more than once")


def test_rejects_truncated_stream():
    blob = _file({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0")
    with pytest.raises(ArtifactError, match="file ended"):
        read_header(io.BytesIO(blob[:20]), len(blob))


def test_validate_header_directly():
    validate_header({"a": {"dtype": "I16", "shape": [2, 2], "data_offsets": [0, 8]}}, 108, 100)
    with pytest.raises(ArtifactError, match="past the end"):
        validate_header({}, 50, 100)


def test_load_artifact_rejects_lying_header_before_reading_tensors():
    manifest = Manifest.for_model("mlp", {"in_features": 4, "hidden": [], "out_features": 2})
    blob = artifact_bytes(build_model(manifest), manifest)
    header_len = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + header_len])
    header["layers.0.bias"]["data_offsets"][1] += 4  # claims more bytes than its shape holds
    body = json.dumps(header).encode()
    lying = struct.pack("<Q", len(body)) + body + blob[8 + header_len :]
    with pytest.raises(ArtifactError, match="do not match shape"):
        load_artifact(lying)
