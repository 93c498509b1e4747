"""Tests for fp16 / bf16 / int8 variants (shared.artifacts.variants / layout)."""

from __future__ import annotations

import pickle

import pytest
import torch

from shared.artifacts import (
    INT8_WEIGHT_ONLY,
    MODEL_DTYPES,
    SCALE_SUFFIX,
    VARIANTS,
    ArtifactError,
    Manifest,
    build_model,
    derive_variant,
    expected_state,
    load_artifact,
    read_manifest,
    save_artifact,
    variant_manifest,
)
from shared.artifacts.layout import dequantize_int8, quantize_int8

# Big enough that the header is a negligible part of the file, small enough to stay fast.
MLP = {"in_features": 64, "hidden": [256, 256], "out_features": 10}
DECODER = {"vocab_size": 64, "context": 16, "width": 64, "depth": 2, "heads": 4}


def _artifact(tmp_path, architecture: str, arguments: dict) -> tuple[Manifest, torch.nn.Module, object]:
    manifest = Manifest.for_model(architecture, arguments)
    torch.manual_seed(0)
    model = build_model(manifest).eval()
    path = tmp_path / f"{architecture}.safetensors"
    save_artifact(model, manifest, path)
    return manifest, model, path


def _outputs(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode():
        return model(x.to(dtype) if x.is_floating_point() else x).float()


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize(
    ("variant", "dtype", "ratio", "tolerance"),
    [
        ("fp16", torch.float16, 0.5, 0.01),
        ("bf16", torch.bfloat16, 0.5, 0.03),
        ("int8", torch.float32, 0.27, 0.05),
    ],
)
def test_variants_load_back_close_to_float32(tmp_path, variant, dtype, ratio, tolerance):
    manifest, model, path = _artifact(tmp_path, "mlp", MLP)
    dest = tmp_path / f"mlp-{variant}.safetensors"
    derived = derive_variant(path, manifest, variant, dest)
    assert read_manifest(dest) == derived
    assert (derived.architecture, derived.arguments, derived.signature) == (
        manifest.architecture,
        manifest.arguments,
        manifest.signature,
    )
    assert MODEL_DTYPES[derived.dtype] == dtype
    assert derived.quantization == (INT8_WEIGHT_ONLY if variant == "int8" else None)
    assert dest.stat().st_size / path.stat().st_size == pytest.approx(ratio, abs=0.03)

    loaded = load_artifact(dest)
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    x = torch.randn(32, MLP["in_features"], generator=torch.Generator().manual_seed(2))
    want, got = _outputs(model, x, torch.float32), _outputs(loaded, x, dtype)
    assert _relative_error(got, want) < tolerance
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_int8_decoder_lm_stays_close(tmp_path):
    _, model, path = _artifact(tmp_path, "decoder-lm", DECODER)
    derived = derive_variant(path, None, "int8", tmp_path / "lm-int8.safetensors")  # manifest from metadata
    loaded = load_artifact(tmp_path / "lm-int8.safetensors", derived)
    x = torch.randint(0, DECODER["vocab_size"], (4, DECODER["context"]), generator=torch.Generator().manual_seed(3))
    assert _relative_error(_outputs(loaded, x, torch.float32), _outputs(model, x, torch.float32)) < 0.05


def test_int8_layout_quantizes_only_matrices(tmp_path):
    manifest, _, path = _artifact(tmp_path, "mlp", MLP)
    derived = derive_variant(path, manifest, "int8", tmp_path / "q.safetensors")
    layout = expected_state(derived)
    assert layout["layers.0.weight"] == ("I8", (256, 64))
    assert layout["layers.0.weight" + SCALE_SUFFIX] == ("F32", (256,))
    assert layout["layers.0.bias"] == ("F32", (256,))
    assert not any(name.startswith("layers.0.bias" + SCALE_SUFFIX) for name in layout)


def test_quantize_int8_round_trip_error_is_bounded():
    weight = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(4))
    weight[2] = 0  # an all-zero channel must not divide by zero
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and scale.shape == (8,) and int(q.abs().max()) <= 127
    restored = dequantize_int8(q, scale)
    assert torch.all((restored - weight).abs() <= scale.view(-1, 1, 1, 1) / 2 + 1e-7)
    assert torch.equal(restored[2], torch.zeros(3, 3, 3))


def test_derive_rejects_unknown_variant_and_non_float32_source(tmp_path):
    manifest, _, path = _artifact(tmp_path, "mlp", {"in_features": 4, "hidden": [], "out_features": 2})
    with pytest.raises(ArtifactError, match=r"unknown variant 'int4' \(known: fp16, bf16, int8\)"):
        derive_variant(path, manifest, "int4", tmp_path / "x.safetensors")
    half = derive_variant(path, manifest, "fp16", tmp_path / "half.safetensors")
    with pytest.raises(ArtifactError, match="derived from float32 artifacts; this one is float16"):
        derive_variant(tmp_path / "half.safetensors", half, "int8", tmp_path / "y.safetensors")
    with pytest.raises(ArtifactError, match="derived from float32"):
        variant_manifest(half, "bf16")
    assert VARIANTS == ("fp16", "bf16", "int8")


def test_saving_float_module_under_variant_manifest_matches_derived_file(tmp_path):
    manifest, model, path = _artifact(tmp_path, "mlp", {"in_features": 4, "hidden": [3], "out_features": 2})
    for variant in VARIANTS:
        target = variant_manifest(manifest, variant)
        save_artifact(model, target, tmp_path / "direct.safetensors")
        derive_variant(path, manifest, variant, tmp_path / "derived.safetensors")
        assert (tmp_path / "direct.safetensors").read_bytes() == (tmp_path / "derived.safetensors").read_bytes()


def test_variant_with_wrong_manifest_is_rejected(tmp_path):
    manifest, _, path = _artifact(tmp_path, "mlp", {"in_features": 4, "hidden": [3], "out_features": 2})
    dest = tmp_path / "q.safetensors"
    derive_variant(path, manifest, "int8", dest)
    with pytest.raises(ArtifactError, match="unexpected tensor"):
        load_artifact(dest, manifest)  # int8 file loaded as if it were float32


def test_variants_load_without_pickle(monkeypatch, tmp_path):
    manifest, _, path = _artifact(tmp_path, "mlp", {"in_features": 4, "hidden": [3], "out_features": 2})

    def forbidden(*args, **kwargs):
        raise AssertionError("artifact loading must not unpickle")

    for target, name in ((pickle, "load"), (pickle, "loads"), (torch, "load"), (torch.serialization, "load")):
        monkeypatch.setattr(target, name, forbidden)
    for variant in VARIANTS:
        dest = tmp_path / f"{variant}.safetensors"
        derive_variant(path, manifest, variant, dest)
        assert isinstance(load_artifact(dest), torch.nn.Module)
