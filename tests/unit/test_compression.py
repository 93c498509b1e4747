"""Tests for the gradient compression codecs (shared.compression)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from shared.compression import CODECS, DTYPES, LEVELS, MAX_NUMEL, Encoded, EncodingError, decode, get_codec
from shared.compression.topk import index_type, topk_count
from shared.compression.wire import tensor_from_bytes, tensor_to_bytes


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _encode(name: str, grad: torch.Tensor, key: str = "w", **options: object) -> Encoded:
    return get_codec(name, **options).encoder().encode(key, grad)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_tensor_bytes_round_trip_every_dtype(dtype: str) -> None:
    torch_dtype = DTYPES[dtype][0]
    t = (_randn(3, 5) * 50).to(torch_dtype)
    blob = tensor_to_bytes(t)
    assert isinstance(blob, bytes) and len(blob) == t.numel() * t.element_size()
    back = tensor_from_bytes(blob, dtype, (3, 5))
    assert back.dtype == torch_dtype and torch.equal(back, t)


def test_tensor_bytes_are_little_endian_row_major_and_keep_bf16_bits() -> None:
    t = torch.tensor([[1, 2], [3, 256]], dtype=torch.int32)
    assert tensor_to_bytes(t.t()) == np.array([1, 3, 2, 256], dtype="<i4").tobytes()
    bf16 = torch.tensor([1.0, -2.5, 3.0e38, 1.0e-38, 0.0], dtype=torch.bfloat16)
    blob = tensor_to_bytes(bf16)
    assert blob == np.array(bf16.view(torch.int16).numpy(), dtype="<i2").tobytes()
    assert torch.equal(tensor_from_bytes(memoryview(blob), "bfloat16", [5]), bf16)
    buffer = bytearray(tensor_to_bytes(torch.tensor(7.5)))
    scalar = tensor_from_bytes(buffer, "float32", ())
    buffer[:] = bytes(4)  # the tensor owns a copy
    assert scalar.shape == () and scalar.item() == 7.5


def test_tensor_from_bytes_rejects_bad_input() -> None:
    cases: list[tuple[object, str, tuple, str]] = [(bytes(8), "float32", (3,), "expected 12")]
    cases += [(bytes(8), "complex64", (1,), "unknown dtype")]
    cases += [(bytes(8), "float32", (-2,), "negative"), (bytes(8), "float32", (2.0,), "only ints")]
    for blob, dtype, shape, match in [*cases, ("abcd", "uint8", (4,), "bytes buffer")]:
        with pytest.raises(EncodingError, match=match):
            tensor_from_bytes(blob, dtype, shape)  # type: ignore[arg-type]


def test_registry_and_unknown_codec() -> None:
    assert set(CODECS) == {"none", "fp16", "bf16", "int8", "topk"}
    assert all(get_codec(name).name == name for name in CODECS)
    with pytest.raises(ValueError, match=r"unknown codec 'zstd'.*none.*topk"):
        get_codec("zstd")
    with pytest.raises(ValueError, match="unknown codec 'zstd'"):
        decode(Encoded("zstd", (1,), {}, {}))


_BAD_OPTIONS: list[tuple[str, dict[str, object]]] = []
_BAD_OPTIONS += [("topk", {"ratio": r}) for r in (0, 1.5, -0.1, math.nan, math.inf, True, "0.1")]
_BAD_OPTIONS += [("int8", {"bucket_size": b}) for b in (0, 2.0, MAX_NUMEL + 1, None)]
_BAD_OPTIONS += [("int8", {"buckets": 4}), ("none", {"ratio": 0.1}), ("topk", {"ratio": 0.1, "seed": 1})]


@pytest.mark.parametrize(("name", "options"), _BAD_OPTIONS)
def test_bad_options_rejected(name: str, options: dict) -> None:
    with pytest.raises(ValueError, match=name):
        get_codec(name, **options)


def test_topk_count() -> None:
    # ceil(ratio * numel) despite float error (0.29 * 100 < 29), at least 1 unless empty, at most numel.
    cases = {(100_000, 0.01): 1000, (100, 0.29): 29, (10, 0.01): 1, (0, 0.5): 0, (7, 1.0): 7}
    assert {args: topk_count(*args) for args in cases} == cases


@pytest.mark.parametrize(("name", "width", "rtol"), [("none", 4, 0.0), ("fp16", 2, 2**-11), ("bf16", 2, 2**-8)])
def test_dense_round_trips(name: str, width: int, rtol: float) -> None:
    grad = _randn(40, 25) * 10
    encoded = _encode(name, grad)
    assert encoded.nbytes == width * grad.numel()
    out = decode(encoded)
    assert out.dtype == torch.float32 and out.shape == grad.shape
    assert torch.equal(out, grad) if name == "none" else torch.allclose(out, grad, rtol=rtol, atol=1e-6)


def test_bf16_keeps_float32_range_and_fp16_overflow_is_rejected() -> None:
    grad = torch.tensor([3.0e38, -1.0e30, 1.0e-30, 0.0])
    torch.testing.assert_close(decode(_encode("bf16", grad)), grad, rtol=2**-8, atol=0.0)
    with pytest.raises(ValueError, match="non-finite"):
        decode(_encode("fp16", torch.tensor([1.0e6])))


def test_int8_error_is_bounded_by_the_bucket_scale() -> None:
    grad = _randn(1000) * torch.linspace(0.01, 100, 1000)  # scales differ a lot between buckets
    encoded = _encode("int8", grad, bucket_size=128)
    assert encoded.meta == {"bucket_size": 128}
    assert encoded.nbytes == grad.numel() + 4 * math.ceil(1000 / 128)
    out = decode(encoded)
    scales = torch.nn.functional.pad(grad.abs(), (0, 24)).view(8, 128).amax(dim=1).repeat_interleave(128)[:1000]
    assert bool(((out - grad).abs() <= scales / LEVELS * (1 + 1e-5)).all())
    # Bucket maxima are on the grid (q = 127) and so reproduced up to float rounding.
    assert torch.allclose(out.abs().max(), grad.abs().max())
    # The bucket is capped at the tensor's size (no padding on the wire); a seeded generator reproduces.
    first = get_codec("int8").encoder(generator=torch.Generator().manual_seed(3)).encode("w", grad[:10])
    assert first.meta == {"bucket_size": 10} and first.nbytes == 10 + 4
    assert first == get_codec("int8").encoder(generator=torch.Generator().manual_seed(3)).encode("w", grad[:10])


def test_int8_is_unbiased() -> None:
    n, draws, bucket = 512, 2000, 128
    grad = _randn(n, seed=1) * torch.linspace(0.1, 3.0, n)
    encoder = get_codec("int8", bucket_size=bucket).encoder(generator=torch.Generator().manual_seed(7))
    mean = torch.stack([decode(encoder.encode("w", grad)) for _ in range(draws)]).double().mean(dim=0)
    step = grad.abs().view(-1, bucket).amax(dim=1).repeat_interleave(bucket).double() / LEVELS
    # Each decode of element i is one of two values `step` apart, so by Hoeffding
    # P(|mean - x| >= t) <= 2 exp(-2 draws t^2 / step^2); t below makes a union over n elements fail with
    # probability < 1e-6. Deterministic (nearest) rounding would be off by up to step / 2, 7x more.
    t = step * math.sqrt(math.log(2 * n / 1e-6) / (2 * draws))
    assert bool(((mean - grad.double()).abs() <= t).all())
    # The average bias over all elements is tighter still: its standard deviation is <= step / (2 sqrt(n draws)).
    assert abs(float(((mean - grad.double()) / step).mean())) < 6 * 0.5 / math.sqrt(n * draws)


def _sent(encoded: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
    dtype, width = index_type(math.prod(encoded.shape))
    p, k = encoded.payload, len(encoded.payload["indices"]) // width
    return tensor_from_bytes(p["indices"], dtype, (k,)).long(), tensor_from_bytes(p["values"], "float32", (k,))


def test_topk_sends_exactly_k_largest_entries_and_is_50x_smaller() -> None:
    grad = _randn(100, 1000)
    encoded = _encode("topk", grad)
    indices, values = _sent(encoded)
    assert indices.numel() == 1000 == len(set(indices.tolist()))
    assert encoded.nbytes == 8 * 1000 and 4 * grad.numel() / encoded.nbytes >= 50
    assert set(indices.tolist()) == set(grad.abs().view(-1).topk(1000).indices.tolist())
    assert torch.equal(values, grad.view(-1)[indices])
    out = decode(encoded)
    assert int(out.count_nonzero()) == 1000 and torch.equal(out.view(-1)[indices], values)


def test_topk_uses_narrow_indices_for_small_tensors() -> None:
    small, large = _encode("topk", _randn(100, 300)), _encode("topk", _randn(200, 200))
    assert len(small.payload["indices"]) == 2 * 300 and small.nbytes == 6 * 300
    assert len(large.payload["indices"]) == 4 * 400 and large.nbytes == 8 * 400
    assert int(decode(small).count_nonzero()) == 300


def test_topk_error_feedback_carries_the_residual() -> None:
    encoder = get_codec("topk", ratio=0.05).encoder()
    grads = [_randn(20, 30, seed=seed) for seed in range(12)]
    decoded = [decode(encoder.encode("w", grads[0]))]
    residual = encoder.residual("w")
    assert residual is not None and torch.equal(decoded[0] + residual, grads[0])
    # The residual enters the next selection: top-k of (gradient + residual), not of the gradient alone.
    encoded = encoder.encode("w", grads[1])
    assert set(_sent(encoded)[0].tolist()) == set((grads[1] + residual).abs().view(-1).topk(30).indices.tolist())
    decoded += [decode(encoded)] + [decode(encoder.encode("w", grad)) for grad in grads[2:]]
    final = encoder.residual("w")
    assert final is not None and bool(final.any()) and encoder.residual("other") is None
    torch.testing.assert_close(sum(decoded) + final, sum(grads), rtol=0, atol=1e-5)


def test_topk_residuals_are_per_key_and_resettable() -> None:
    encoder = get_codec("topk", ratio=0.1).encoder()
    encoder.encode("a", grad := _randn(50))
    encoder.encode("b", _randn(7))
    assert torch.equal(grad, _randn(50))  # the caller's gradient is never modified
    with pytest.raises(ValueError, match="reset"):
        encoder.encode("a", _randn(5, 10))
    encoder.reset("a")
    assert encoder.residual("a") is None and encoder.residual("b") is not None
    transposed = _randn(10, 5).t()  # non-contiguous gradients are fine
    total = decode(encoder.encode("a", transposed)) + decode(encoder.encode("a", transposed))
    torch.testing.assert_close(total + encoder.residual("a"), 2 * transposed)  # type: ignore[operator]
    encoder.reset()
    assert encoder.residual("a") is None and encoder.residual("b") is None


@pytest.mark.parametrize("name", list(CODECS))
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,)])
def test_scalars_and_empty_tensors(name: str, shape: tuple[int, ...]) -> None:
    grad = _randn(*shape)
    encoded = _encode(name, grad)
    assert encoded.shape == shape and (encoded.nbytes == 0) == (grad.numel() == 0)
    out = decode(encoded)
    assert out.shape == grad.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, grad, rtol=2**-8, atol=0.0)  # one element is always exact enough


@pytest.mark.parametrize("name", list(CODECS))
def test_encoders_reject_non_float_gradients(name: str) -> None:
    encoder = get_codec(name).encoder()
    with pytest.raises(ValueError, match="floating-point"):
        encoder.encode("w", torch.arange(4))
    with pytest.raises(ValueError, match="key"):
        encoder.encode(3, torch.ones(4))  # type: ignore[arg-type]


def _valid(name: str) -> Encoded:
    return _encode(name, _randn(4, 8), ratio=0.25) if name == "topk" else _encode(name, _randn(4, 8))


def _with_payload(name: str, **buffers: bytes) -> Encoded:
    return dataclasses.replace(encoded := _valid(name), payload={**encoded.payload, **buffers})


def _with_meta(name: str, **meta: object) -> Encoded:
    return dataclasses.replace(encoded := _valid(name), meta={**encoded.meta, **meta})  # type: ignore[dict-item]


_raw = tensor_to_bytes
_INVALID = [
    (dataclasses.replace(_valid("none"), codec=3), "unknown codec 3"),  # type: ignore[arg-type]
    (dataclasses.replace(_valid("none"), shape=(-4, -8)), "negative"),
    (dataclasses.replace(_valid("none"), shape=(4, 8.0)), "only ints"),  # type: ignore[arg-type]
    (dataclasses.replace(_valid("none"), shape="4x8"), "tuple of ints"),  # type: ignore[arg-type]
    (dataclasses.replace(_valid("none"), shape=(1,) * 33), "dimensions"),
    (dataclasses.replace(_valid("topk"), shape=(2**31,)), "elements"),
    (dataclasses.replace(_valid("none"), shape=(4, 9)), r"'data'.*expected 144"),
    (dataclasses.replace(_valid("none"), payload={}), "payload keys"),
    (dataclasses.replace(_valid("none"), payload=[]), "dict of str to bytes"),  # type: ignore[arg-type]
    (_with_payload("none", data="x" * 128), "dict of str to bytes"),  # type: ignore[arg-type]
    (_with_payload("none", extra=b""), "payload keys"),
    (_with_payload("fp16", data=bytes(63)), "expected 64"),
    (_with_payload("none", data=_raw(torch.full((4, 8), float("nan")))), "non-finite"),
    (_with_meta("bf16", scale=1.0), "meta keys"),
    (_with_meta("int8", bucket_size="32"), "dict of str to int or float"),
    (dataclasses.replace(_valid("int8"), meta={}), "meta keys"),
    (_with_meta("int8", bucket_size=0), "bucket_size"),
    (_with_meta("int8", bucket_size=True), "int or float"),
    (_with_meta("int8", bucket_size=1.5), "bucket_size"),
    (_with_meta("int8", bucket_size=16), r"'scales'.*expected 8"),
    (_with_payload("int8", q=bytes(31)), r"'q'.*expected 32"),
    (_with_payload("int8", scales=_raw(torch.tensor([float("inf")]))), "non-finite"),
    (_with_payload("int8", scales=_raw(torch.tensor([-1.0]))), "negative"),
    (_with_payload("int8", q=_raw(torch.full((32,), -128, dtype=torch.int8))), "outside"),
    (_with_payload("topk", indices=bytes(31)), "multiple of 2"),
    (_with_payload("topk", values=bytes(28)), r"'values'.*expected 32"),
    (_with_payload("topk", indices=_raw(torch.arange(33, dtype=torch.int16)), values=bytes(132)), "33 entries"),
    (_with_payload("topk", indices=_raw(torch.arange(25, 33, dtype=torch.int16))), "out of range"),
    (_with_payload("topk", indices=_raw(torch.arange(-1, 7, dtype=torch.int16))), "out of range"),
    (_with_payload("topk", indices=_raw(torch.zeros(8, dtype=torch.int16))), "duplicate"),
    (_with_payload("topk", values=_raw(torch.full((8,), float("nan")))), "non-finite"),
    ({"codec": "none"}, "expected an Encoded"),
]


@pytest.mark.parametrize(("encoded", "match"), _INVALID)
def test_invalid_encodings_are_rejected(encoded: Encoded, match: str) -> None:
    with pytest.raises(EncodingError, match=match):
        decode(encoded)


def test_encoded_survives_a_protobuf_like_rebuild() -> None:
    # Protobuf hands back repeated ints as a sequence and bytes as fresh objects.
    encoded = _valid("int8")
    rebuilt = Encoded(
        codec=str(encoded.codec),
        shape=list(encoded.shape),  # type: ignore[arg-type]
        payload={key: bytes(bytearray(value)) for key, value in encoded.payload.items()},
        meta={key: float(value) for key, value in encoded.meta.items()},  # as a map of doubles would
    )
    assert torch.equal(decode(rebuilt, torch.device("cpu"), expected_shape=torch.Size([4, 8])), decode(encoded))
    with pytest.raises(ValueError, match=r"expected \(8, 4\)"):
        decode(rebuilt, expected_shape=(8, 4))


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(sorted(CODECS)),
    grad=arrays(
        np.float32,
        array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
        elements=st.floats(-1e4, 1e4, width=32),
    ),
)
def test_round_trip_property(name: str, grad: np.ndarray) -> None:
    x = torch.from_numpy(grad)
    encoder = get_codec(name).encoder()
    encoded = encoder.encode("p", x)
    assert encoded.codec == name and encoded.shape == tuple(x.shape)
    out = decode(encoded, expected_shape=x.shape)
    assert out.dtype == torch.float32 and out.shape == x.shape
    if name == "none":
        assert torch.equal(out, x)
    elif name in ("fp16", "bf16"):
        rtol = 2**-11 if name == "fp16" else 2**-8
        assert bool(((out - x).abs() <= x.abs() * rtol + 2**-24).all())
    elif name == "int8":
        bound = (x.abs().max() if x.numel() else torch.tensor(0.0)) / LEVELS
        assert bool(((out - x).abs() <= bound * (1 + 1e-5) + 1e-37).all())  # slack: subnormals
    else:
        residual = encoder.residual("p")
        assert residual is not None and torch.equal(out + residual, x)
        assert int(out.count_nonzero()) <= topk_count(x.numel(), 0.01)
