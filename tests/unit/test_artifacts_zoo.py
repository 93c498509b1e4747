"""Tests for the architecture zoo and artifact save/load (shared.artifacts.zoo / io)."""

from __future__ import annotations

import pickle
from collections.abc import Iterator

import pytest
import torch

from shared.artifacts import (
    DEFAULT_MAX_ELEMENTS,
    MANIFEST_METADATA_KEY,
    ArtifactError,
    Manifest,
    architectures,
    artifact_bytes,
    build_model,
    check_weights,
    configure_zoo_limits,
    datatype_to_torch,
    expected_state,
    get_architecture,
    greedy_generate,
    load_artifact,
    read_manifest,
    save_artifact,
    zoo_max_elements,
)
from shared.settings import CommonSettings

TINY = {
    "mlp": {"in_features": 6, "hidden": [5, 4], "out_features": 3, "activation": "gelu"},
    "cnn": {"in_channels": 1, "image_size": 8, "channels": [4, 6], "num_classes": 10},
    "lstm-classifier": {
        "vocab_size": 20,
        "embed_dim": 6,
        "hidden_size": 5,
        "num_layers": 2,
        "num_classes": 3,
    },
    "transformer-classifier": {
        "vocab_size": 30,
        "seq_len": 7,
        "width": 8,
        "depth": 2,
        "heads": 2,
        "num_classes": 4,
    },
    "decoder-lm": {"vocab_size": 17, "context": 9, "width": 8, "depth": 2, "heads": 2},
}


def _example_input(manifest: Manifest, batch: int = 3, length: int = 5) -> torch.Tensor:
    spec = manifest.signature.inputs[0]
    shape = [batch] + [length if d == -1 else d for d in spec.shape[1:]]
    generator = torch.Generator().manual_seed(1)
    if spec.datatype == "INT64":
        return torch.randint(0, manifest.arguments["vocab_size"], shape, generator=generator)
    return torch.randn(shape, generator=generator)


def _run(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def test_zoo_lists_the_builtin_architectures():
    assert set(TINY) <= set(architectures())
    assert architectures() == sorted(architectures())


def _assert_matches(spec_shape: tuple[int, ...], shape: torch.Size, batch: int) -> None:
    assert len(shape) == len(spec_shape) and shape[0] == batch
    assert all(want in (-1, got) for want, got in zip(spec_shape, shape, strict=True))


@pytest.mark.parametrize("architecture", sorted(TINY))
def test_every_architecture_builds_with_defaults_and_matches_its_signature(architecture):
    manifest = Manifest.for_model(architecture)
    assert manifest.arguments == get_architecture(architecture).default_arguments()
    # Defaults can be large; on the meta device neither build nor forward allocates memory.
    model = build_model(manifest, device="meta").eval()
    assert all(p.is_meta for p in model.parameters())
    spec = manifest.signature.inputs[0]
    shape = [2] + [5 if d == -1 else d for d in spec.shape[1:]]
    x = torch.empty(shape, dtype=datatype_to_torch(spec.datatype), device="meta")
    _assert_matches(manifest.signature.outputs[0].shape, _run(model, x).shape, batch=2)


@pytest.mark.parametrize("architecture", sorted(TINY))
def test_forward_shape_matches_signature(architecture):
    manifest = Manifest.for_model(architecture, TINY[architecture])
    output = _run(build_model(manifest).eval(), _example_input(manifest))
    assert output.dtype == torch.float32
    _assert_matches(manifest.signature.outputs[0].shape, output.shape, batch=3)


@pytest.mark.parametrize("architecture", sorted(TINY))
def test_save_load_round_trip_gives_identical_outputs(architecture, tmp_path):
    manifest = Manifest.for_model(architecture, TINY[architecture])
    torch.manual_seed(0)
    model = build_model(manifest).eval()
    x = _example_input(manifest)
    expected = _run(model, x)
    path = tmp_path / "model.safetensors"
    save_artifact(model, manifest, path)
    for source in (path, str(path), artifact_bytes(model, manifest)):
        loaded = load_artifact(source)
        assert not loaded.training
        assert torch.equal(_run(loaded, x), expected)
    assert read_manifest(path) == manifest


@pytest.mark.parametrize("architecture", sorted(TINY))
def test_models_are_deterministic_given_seed(architecture):
    manifest = Manifest.for_model(architecture, TINY[architecture])
    states = []
    for _ in range(2):
        torch.manual_seed(123)
        states.append(build_model(manifest).state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("architecture", sorted(TINY))
def test_expected_state_matches_real_state_dict(architecture):
    manifest = Manifest.for_model(architecture, TINY[architecture])
    state = build_model(manifest).state_dict()
    assert expected_state(manifest) == {name: ("F32", tuple(t.shape)) for name, t in state.items()}
    half = Manifest.for_model(architecture, TINY[architecture], dtype="float16")
    assert {dtype for dtype, _ in expected_state(half).values()} == {"F16"}


def test_build_model_casts_to_manifest_dtype():
    manifest = Manifest.for_model("mlp", TINY["mlp"], dtype="bfloat16")
    assert {p.dtype for p in build_model(manifest).parameters()} == {torch.bfloat16}


@pytest.fixture
def zoo_limits() -> Iterator[None]:
    """Restores the process-wide zoo caps a test lowers."""
    try:
        yield
    finally:
        configure_zoo_limits(DEFAULT_MAX_ELEMENTS)


def test_build_model_refuses_a_model_over_the_configured_cap(zoo_limits):
    manifest = Manifest.for_model("mlp", TINY["mlp"])  # 6*5+5 + 5*4+4 + 4*3+3 = 74 weights
    configure_zoo_limits(73)
    assert zoo_max_elements() == 73
    with pytest.raises(ArtifactError, match=r"'mlp' with these arguments has 74 weights, more than the limit of 73"):
        build_model(manifest)
    build_model(manifest, "meta")  # shapes only: nothing is allocated, so nothing is refused
    configure_zoo_limits(74)
    assert sum(p.numel() for p in build_model(manifest).parameters()) == 74


def test_zoo_cap_defaults_to_the_setting_and_rejects_nonsense(zoo_limits):
    assert zoo_max_elements() == DEFAULT_MAX_ELEMENTS
    assert CommonSettings.model_fields["zoo_max_elements"].default == DEFAULT_MAX_ELEMENTS
    with pytest.raises(ValueError, match="max_elements must be >= 1"):
        configure_zoo_limits(0)
    assert zoo_max_elements() == DEFAULT_MAX_ELEMENTS


def test_build_rejects_unknown_and_bad_arguments():
    architecture = get_architecture("transformer-classifier")
    with pytest.raises(ArtifactError, match="unknown argument 'layers'"):
        architecture.build({"layers": 2})
    with pytest.raises(ArtifactError, match="width 10 is not divisible by heads 4"):
        architecture.signature({"width": 10})
    with pytest.raises(ArtifactError, match="unknown architecture 'resnet'"):
        get_architecture("resnet")


def test_load_rejects_weights_that_do_not_fit_the_manifest():
    manifest = Manifest.for_model("mlp", TINY["mlp"])
    blob = artifact_bytes(build_model(manifest), manifest)
    wider = Manifest.for_model("mlp", {**TINY["mlp"], "hidden": [5, 8]})
    with pytest.raises(ArtifactError, match=r"tensor 'layers.2.bias' has shape \[4\], .* needs \[8\]"):
        load_artifact(blob, wider)
    deeper = Manifest.for_model("mlp", {**TINY["mlp"], "hidden": [5, 4, 4]})
    with pytest.raises(ArtifactError, match="missing 2 tensor"):
        load_artifact(blob, deeper)
    half = Manifest.for_model("mlp", TINY["mlp"], dtype="float16")
    with pytest.raises(ArtifactError, match=r"is F32, but .* stores it as F16"):
        load_artifact(blob, half)
    with pytest.raises(ArtifactError, match=r"unexpected tensor\(s\) .* 'extra'"):
        check_weights(manifest, {**expected_state(manifest), "extra": ("F32", (1,))})


def test_load_requires_a_manifest():
    import safetensors.torch

    blob = safetensors.torch.save({"w": torch.ones(1)})
    with pytest.raises(ArtifactError, match=f"no embedded manifest .*'{MANIFEST_METADATA_KEY}'"):
        load_artifact(blob)
    bad = safetensors.torch.save({"w": torch.ones(1)}, metadata={MANIFEST_METADATA_KEY: "{"})
    with pytest.raises(ArtifactError, match="manifest: not valid JSON"):
        load_artifact(bad)


def test_save_rejects_mismatched_module_and_meta_module(tmp_path):
    manifest = Manifest.for_model("mlp", TINY["mlp"])
    other = build_model(Manifest.for_model("mlp", {**TINY["mlp"], "out_features": 4}))
    with pytest.raises(ArtifactError, match="has shape"):
        save_artifact(other, manifest, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    with pytest.raises(ArtifactError, match="meta device"):
        artifact_bytes(build_model(manifest, device="meta"), manifest)


def test_load_never_unpickles(monkeypatch, tmp_path):
    manifest = Manifest.for_model("lstm-classifier", TINY["lstm-classifier"])
    model = build_model(manifest).eval()
    save_artifact(model, manifest, tmp_path / "m.safetensors")

    def forbidden(*args, **kwargs):
        raise AssertionError("artifact loading must not unpickle")

    for target, name in ((pickle, "load"), (pickle, "loads"), (torch, "load"), (torch.serialization, "load")):
        monkeypatch.setattr(target, name, forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    loaded = load_artifact(tmp_path / "m.safetensors")
    x = _example_input(manifest)
    assert torch.equal(_run(loaded, x), _run(model, x))


def test_token_models_reject_out_of_range_ids():
    manifest = Manifest.for_model("decoder-lm", TINY["decoder-lm"])
    model = build_model(manifest)
    with pytest.raises(ValueError, match=r"input_ids must be in \[0, 17\)"):
        _run(model, torch.tensor([[1, 17]]))
    with pytest.raises(ValueError, match="1 <= length <= 9"):
        _run(model, torch.zeros(1, 10, dtype=torch.int64))


def test_greedy_generate_streams_argmax_tokens():
    manifest = Manifest.for_model("decoder-lm", TINY["decoder-lm"])
    torch.manual_seed(0)
    model = build_model(manifest).eval()
    prompt = [1, 2, 3]
    tokens = list(greedy_generate(model, prompt, 12))  # longer than context: the window slides
    assert len(tokens) == 12 and all(isinstance(t, int) and 0 <= t < 17 for t in tokens)
    first = int(_run(model, torch.tensor([prompt]))[0, -1].argmax())
    assert tokens[0] == first
    assert list(greedy_generate(model, torch.tensor([prompt]), 12)) == tokens
    assert list(greedy_generate(model, prompt, 12, eos_id=tokens[2])) == tokens[: tokens.index(tokens[2]) + 1]
    stream = greedy_generate(model, prompt, 2)
    next(stream)
    assert not torch.is_inference_mode_enabled()  # the suspended generator must not leak the mode


def test_greedy_generate_validates_eagerly():
    model = build_model(Manifest.for_model("decoder-lm", TINY["decoder-lm"]))
    with pytest.raises(ValueError, match="at least one token"):
        greedy_generate(model, [], 3)
    with pytest.raises(ValueError, match="input_ids must be in"):
        greedy_generate(model, [99], 3)
