"""Tests for training datasets (shared.datasets): validation at submit time, loading, splits and shards."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.datasets import DATASETS, Dataset, DatasetSpec, fingerprint_arrays, load, validate
from shared.datasets.text import windows
from shared.errors import FailedPrecondition, InvalidArgument

MLP = {"in_features": 64, "hidden": [8], "out_features": 10}
SMALL = {"num_samples": 60, "num_features": 4, "num_classes": 3}


def _field(exc: pytest.ExceptionInfo[InvalidArgument]) -> str:
    return exc.value.violations[0].field


def _rows(x: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(row) for row in x.reshape(len(x), -1).tolist()}


def _write_csv(path: Path, header: str, rows: list[str]) -> str:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return str(path)


# --- digits --------------------------------------------------------------------------------------------


def test_digits_for_cnn_are_scaled_images() -> None:
    dataset = load(DatasetSpec("digits"), "cnn", {})
    x, y = dataset.train.tensors
    info = dataset.info
    assert info.num_train + info.num_validation == 1797
    assert info.num_validation == 359  # floor(1797 * 0.2)
    assert info.sample_shape == (1, 8, 8) and info.num_classes == 10
    assert x.shape == (info.num_train, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (info.num_train,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert dataset.validation.tensors[0].shape == (359, 1, 8, 8)
    assert validate(DatasetSpec("digits"), "cnn", {}) == info


def test_digits_for_mlp_are_flat_and_the_same_samples() -> None:
    flat = load(DatasetSpec("digits"), "mlp", MLP)
    images = load(DatasetSpec("digits"), "cnn", {})
    assert flat.info.sample_shape == (64,)
    assert flat.train.tensors[0].shape == (1438, 64)
    assert torch.equal(flat.train.tensors[0], images.train.tensors[0].reshape(-1, 64))
    assert flat.info.fingerprint == images.info.fingerprint


def test_split_is_deterministic_by_seed_and_partitions_the_data() -> None:
    spec = DatasetSpec("synthetic-classification", SMALL, validation_fraction=0.25, seed=3)
    arguments = {"in_features": 4, "out_features": 3}
    first, again = load(spec, "mlp", arguments), load(spec, "mlp", arguments)
    for a, b in zip(
        first.train.tensors + first.validation.tensors, again.train.tensors + again.validation.tensors, strict=True
    ):
        assert torch.equal(a, b)
    other = load(DatasetSpec("synthetic-classification", SMALL, validation_fraction=0.25, seed=4), "mlp", arguments)
    assert not torch.equal(first.validation.tensors[0], other.validation.tensors[0])
    # The split seed changes the split, never the data.
    assert first.info.fingerprint == other.info.fingerprint
    train, held_out = _rows(first.train.tensors[0]), _rows(first.validation.tensors[0])
    assert len(train) == 45 and len(held_out) == 15 and not train & held_out
    assert train | held_out == _rows(other.train.tensors[0]) | _rows(other.validation.tensors[0])


def test_zero_validation_fraction_keeps_every_sample_for_training() -> None:
    dataset = load(DatasetSpec("digits", validation_fraction=0.0), "cnn", {})
    assert dataset.info.num_validation == 0 and len(dataset.validation) == 0
    assert len(dataset.train) == 1797


@pytest.mark.parametrize("world_size", [1, 3, 4, 7])
def test_shards_are_disjoint_balanced_and_cover_the_training_set(world_size: int) -> None:
    dataset = load(DatasetSpec("synthetic-classification", SMALL), "mlp", {"in_features": 4, "out_features": 3})
    x, y = dataset.train.tensors
    shards = [dataset.shard(rank, world_size) for rank in range(world_size)]
    sizes = [len(sx) for sx, _ in shards]
    assert sum(sizes) == len(x) and max(sizes) - min(sizes) <= 1
    seen: set[tuple[float, ...]] = set()
    for sx, sy in shards:
        assert len(sx) == len(sy) and sx.is_contiguous()
        rows = _rows(sx)
        assert not rows & seen
        seen |= rows
    assert seen == _rows(x)
    # Strided: worker r holds samples r, r + world_size, ... with their own labels.
    assert torch.equal(shards[-1][1], y[world_size - 1 :: world_size])


@pytest.mark.parametrize(("rank", "world_size", "field"), [(0, 0, "world_size"), (2, 2, "rank"), (-1, 2, "rank")])
def test_bad_shard_requests_are_rejected(rank: int, world_size: int, field: str) -> None:
    dataset = load(DatasetSpec("digits"), "cnn", {})
    with pytest.raises(InvalidArgument) as exc:
        dataset.shard(rank, world_size)
    assert _field(exc) == field


def test_more_workers_than_training_samples_is_rejected() -> None:
    dataset = load(DatasetSpec("synthetic-classification", {**SMALL, "num_samples": 5}), "mlp", {"in_features": 4})
    with pytest.raises(InvalidArgument, match="only 4 samples"):
        dataset.shard(0, 5)


# --- fingerprints --------------------------------------------------------------------------------------


def test_fingerprints_are_stable_and_tell_data_apart() -> None:
    a = np.arange(12, dtype=np.int64)
    assert fingerprint_arrays(a) == fingerprint_arrays(a.copy()) == fingerprint_arrays(a.astype(">i8"))
    assert fingerprint_arrays(a) == fingerprint_arrays(torch.arange(12))
    assert fingerprint_arrays(a) != fingerprint_arrays(a.reshape(3, 4))
    assert fingerprint_arrays(a) != fingerprint_arrays(a.astype(np.int32))
    assert fingerprint_arrays(a) != fingerprint_arrays(a + 1)
    assert fingerprint_arrays(a[:6], a[6:]) != fingerprint_arrays(a[:5], a[5:])
    assert len(fingerprint_arrays(a)) == 64
    with pytest.raises(TypeError):
        fingerprint_arrays(np.array(["text"]))


def test_dataset_fingerprints_follow_the_content() -> None:
    def fingerprint(**options: int) -> str:
        spec = DatasetSpec("synthetic-classification", {**SMALL, **options})
        return validate(spec, "mlp", {"in_features": 4, "out_features": 3}).fingerprint

    assert fingerprint() == fingerprint()
    assert fingerprint(seed=1) != fingerprint()
    assert fingerprint(num_samples=61) != fingerprint()
    digits = validate(DatasetSpec("digits"), "cnn", {}).fingerprint
    assert digits == validate(DatasetSpec("digits"), "mlp", MLP).fingerprint != fingerprint()


def test_load_refuses_data_that_changed_since_validation(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((10, 3), np.float32), y=np.zeros(10, np.int64))
    spec, arguments = DatasetSpec("file", {"path": str(path)}), {"in_features": 3, "out_features": 2}
    submitted = validate(spec, "mlp", arguments).fingerprint
    np.savez(path, x=np.zeros((10, 3), np.float32), y=np.zeros(10, np.int64))
    with pytest.raises(FailedPrecondition, match="changed"):
        load(spec, "mlp", arguments, expected_fingerprint=submitted)


# --- user files ----------------------------------------------------------------------------------------


def test_npz_round_trip_and_fingerprint_is_file_sha256(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 5)).astype(np.float32), np.arange(40) % 3
    path = tmp_path / "data.npz"
    np.savez_compressed(path, x=x, y=y, notes=np.zeros(2))
    dataset = load(DatasetSpec("file", {"path": "data.npz"}), "mlp", {"in_features": 5}, data_root=tmp_path)
    assert dataset.info.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()
    assert dataset.info.num_classes == 3 and dataset.info.sample_shape == (5,)
    got = torch.cat([dataset.train.tensors[0], dataset.validation.tensors[0]])
    labels = torch.cat([dataset.train.tensors[1], dataset.validation.tensors[1]])
    assert _rows(got) == _rows(torch.from_numpy(x))
    by_row = {tuple(row): int(label) for row, label in zip(x.tolist(), y.tolist(), strict=True)}
    assert all(by_row[tuple(row)] == int(label) for row, label in zip(got.tolist(), labels.tolist(), strict=True))


def test_npz_images_and_token_sequences(tmp_path: Path) -> None:
    images = tmp_path / "images.npz"
    np.savez(images, x=np.zeros((10, 8, 8), np.uint8), y=np.arange(10))
    info = validate(DatasetSpec("file", {"path": str(images)}), "cnn", {})
    assert info.sample_shape == (1, 8, 8)
    tokens = tmp_path / "tokens.npz"
    np.savez(tokens, x=np.arange(60).reshape(10, 6) % 20, y=np.arange(10) % 2)
    dataset = load(DatasetSpec("file", {"path": str(tokens)}), "lstm-classifier", {"vocab_size": 20})
    assert dataset.train.tensors[0].dtype == torch.int64 and dataset.info.sample_shape == (6,)
    with pytest.raises(InvalidArgument) as exc:
        validate(DatasetSpec("file", {"path": str(tokens)}), "transformer-classifier", {"vocab_size": 10})
    assert _field(exc) == "arguments.vocab_size"


def test_csv_round_trip(tmp_path: Path) -> None:
    rows = [f"{i},{i * 0.5},{-i},{i % 4}" for i in range(12)]
    path = _write_csv(tmp_path / "data.csv", "a,b,c,label", ["", *rows])
    dataset = load(DatasetSpec("file", {"path": path}, validation_fraction=0.25), "mlp", {"in_features": 3})
    assert dataset.info.num_train == 9 and dataset.info.num_validation == 3 and dataset.info.num_classes == 4
    x = torch.cat([dataset.train.tensors[0], dataset.validation.tensors[0]])
    y = torch.cat([dataset.train.tensors[1], dataset.validation.tensors[1]])
    assert _rows(x) == {(float(i), i * 0.5, float(-i)) for i in range(12)}
    assert all(int(label) == int(row[0]) % 4 for row, label in zip(x.tolist(), y.tolist(), strict=True))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((4, 2))}, 'no array "y"'),
        ({"features": np.zeros((4, 2)), "y": np.zeros(4, np.int64)}, 'no array "x"'),
        ({"x": np.zeros((4, 2)), "y": np.zeros(3, np.int64)}, 'has 4 samples but "y" has 3'),
        ({"x": np.zeros((4, 2)), "y": np.zeros(4)}, "integer class labels"),
        ({"x": np.zeros(4), "y": np.zeros(4, np.int64)}, "shape"),
        ({"x": np.full((4, 2), np.nan), "y": np.zeros(4, np.int64)}, "NaN"),
        ({"x": np.zeros((4, 2)), "y": -np.ones(4, np.int64)}, "label -1"),
        ({"x": np.array([[{}]], dtype=object), "y": np.zeros(1, np.int64)}, "Python objects"),
    ],
)
def test_bad_npz_layouts_are_rejected(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays, allow_pickle=True)
    with pytest.raises(InvalidArgument, match=message) as exc:
        validate(DatasetSpec("file", {"path": str(path)}), "mlp", {"in_features": 2})
    assert _field(exc) == "dataset.options.path"


def test_npz_members_must_be_npy_arrays_by_their_exact_names(tmp_path: Path) -> None:
    # A member named plain "x" is raw bytes to np.load, not an array: it must not pass for "x.npy".
    import zipfile

    path = tmp_path / "renamed.npz"
    np.savez(path, y=np.zeros(3, np.int64))
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("x", b"\x93NUMPY not really an array")
    with pytest.raises(InvalidArgument, match='no array "x"'):
        validate(DatasetSpec("file", {"path": str(path)}), "mlp", {"in_features": 2})


def test_non_npz_bytes_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(InvalidArgument, match=r"not a readable \.npz"):
        validate(DatasetSpec("file", {"path": str(path)}), "mlp", {"in_features": 2})


@pytest.mark.parametrize(
    ("header", "rows", "message"),
    [
        ("a,b,label", ["1,2,0", "3,oops,1"], "line 3, column \"b\": 'oops' is not a number"),
        ("a,b,label", ["1,2,0", "3,4,1.5"], "'1.5' is not an integer class label"),
        ("a,b,label", ["1,2,0", "3,4"], "line 3 has 2 columns but the header has 3"),
        ("1,2,0", ["3,4,1"], "header"),
        ("a,b,label", [], "no sample rows"),
        ("a,b,label", ["1,inf,0"], "not a finite number"),
    ],
)
def test_bad_csv_layouts_are_rejected(tmp_path: Path, header: str, rows: list[str], message: str) -> None:
    path = _write_csv(tmp_path / "bad.csv", header, rows)
    with pytest.raises(InvalidArgument, match=message):
        validate(DatasetSpec("file", {"path": path}), "mlp", {"in_features": 2})


def test_labels_beyond_the_architecture_classes_are_rejected(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv", "a,b,label", ["1,2,0", "3,4,12"])
    with pytest.raises(InvalidArgument, match="labels up to 12") as exc:
        validate(DatasetSpec("file", {"path": path}), "mlp", {"in_features": 2, "out_features": 10})
    assert _field(exc) == "arguments.out_features"


def test_feature_count_must_match_the_architecture(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv", "a,b,c,label", ["1,2,3,0", "3,4,5,1"])
    with pytest.raises(InvalidArgument, match="samples have 3 features") as exc:
        validate(DatasetSpec("file", {"path": path}), "mlp", {"in_features": 4})
    assert _field(exc) == "arguments.in_features"
    with pytest.raises(InvalidArgument, match=r"shape \(1, 8, 8\)"):
        validate(DatasetSpec("file", {"path": path}), "cnn", {})


def test_file_options_are_checked(tmp_path: Path) -> None:
    def field(options: dict[str, str | int | float], **kwargs: Path) -> str:
        with pytest.raises(InvalidArgument) as exc:
            validate(DatasetSpec("file", options), "mlp", {"in_features": 2}, **kwargs)
        return _field(exc)

    assert field({}) == "dataset.options.path"
    assert field({"path": str(tmp_path / "missing.csv")}) == "dataset.options.path"
    assert field({"path": str(tmp_path), "format": "csv"}) == "dataset.options.path"
    assert field({"path": "data.parquet"}) == "dataset.options.format"
    assert field({"path": "d.csv", "format": "xlsx"}) == "dataset.options.format"
    assert field({"path": "d.csv", "colour": "red"}) == "dataset.options.colour"
    outside = tmp_path / "outside.csv"
    _write_csv(outside, "a,b,label", ["1,2,0", "3,4,1"])
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(InvalidArgument, match="outside the data directory"):
        validate(DatasetSpec("file", {"path": "../outside.csv"}), "mlp", {"in_features": 2}, data_root=root)
    with pytest.raises(InvalidArgument, match="outside the data directory"):
        validate(DatasetSpec("file", {"path": str(outside)}), "mlp", {"in_features": 2}, data_root=root)


# --- names, options and architectures ------------------------------------------------------------------


def test_unknown_dataset_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="unknown dataset 'imagenet'") as exc:
        validate(DatasetSpec("imagenet"), "cnn", {})
    assert _field(exc) == "dataset.name"
    assert set(DATASETS) == {"digits", "file", "synthetic-classification", "synthetic-sequences", "text"}


@pytest.mark.parametrize("architecture", ["transformer-classifier", "lstm-classifier", "decoder-lm"])
def test_digits_with_a_sequence_architecture_is_rejected(architecture: str) -> None:
    with pytest.raises(InvalidArgument, match=f"architecture '{architecture}' takes") as exc:
        validate(DatasetSpec("digits"), architecture, {})
    assert _field(exc) == "dataset.name"


@pytest.mark.parametrize(
    ("spec", "architecture", "arguments", "field"),
    [
        (DatasetSpec("digits", {"size": 3}), "cnn", {}, "dataset.options.size"),
        (DatasetSpec("digits", validation_fraction=1.0), "cnn", {}, "dataset.validation_fraction"),
        (DatasetSpec("digits", seed=-1), "cnn", {}, "dataset.seed"),
        (DatasetSpec("digits"), "resnet", {}, "architecture"),
        (DatasetSpec("digits"), "cnn", {"depth": 3}, "arguments"),
        (DatasetSpec("digits"), "mlp", {}, "arguments.in_features"),
        (DatasetSpec("digits"), "cnn", {"num_classes": 5}, "arguments.num_classes"),
        (DatasetSpec("digits"), "cnn", {"image_size": 16}, "arguments.image_size"),
        (DatasetSpec("digits"), "cnn", {"in_channels": 3}, "arguments.in_channels"),
        (DatasetSpec("synthetic-classification", {"num_samples": 1.5}), "mlp", {}, "dataset.options.num_samples"),
        (DatasetSpec("synthetic-sequences", {"seq_len": 200}), "transformer-classifier", {}, "arguments.seq_len"),
        (DatasetSpec("synthetic-sequences", {"vocab_size": 4, "num_classes": 5}), "lstm-classifier", {}, None),
        (DatasetSpec("text", {"context": 64}), "decoder-lm", {"context": 32}, "dataset.options.context"),
        (DatasetSpec("text", {"corpus": "bible"}), "decoder-lm", {}, "dataset.options.corpus"),
    ],
)
def test_bad_specs_name_the_offending_field(
    spec: DatasetSpec, architecture: str, arguments: dict[str, object], field: str | None
) -> None:
    with pytest.raises(InvalidArgument) as exc:
        validate(spec, architecture, arguments)
    assert _field(exc) == (field or "dataset.options.num_classes")


def test_numeric_options_accept_json_floats_and_strings() -> None:
    spec = DatasetSpec("synthetic-classification", {"num_samples": "50", "num_features": 4.0, "cluster_std": "0.1"})
    info = validate(spec, "mlp", {"in_features": 4, "out_features": 2})
    assert info.num_train + info.num_validation == 50


def test_synthetic_features_fit_a_cnn_when_the_size_matches() -> None:
    spec = DatasetSpec("synthetic-classification", {"num_samples": 20, "num_features": 64})
    assert validate(spec, "cnn", {"num_classes": 2}).sample_shape == (1, 8, 8)


def test_synthetic_sequences_are_labelled_by_majority_band() -> None:
    options = {"num_samples": 200, "seq_len": 9, "vocab_size": 10, "num_classes": 2}
    dataset = load(DatasetSpec("synthetic-sequences", options, validation_fraction=0.0), "transformer-classifier", {})
    x, y = dataset.train.tensors
    assert x.dtype == torch.int64 and x.shape == (200, 9) and int(x.max()) < 10
    high = (x >= 5).sum(dim=1)
    assert torch.equal(y, (high > 4).long())  # odd length: no ties
    assert 0 < int(y.sum()) < 200


# --- text ----------------------------------------------------------------------------------------------


def test_text_windows_are_shifted_by_one_byte(tmp_path: Path) -> None:
    data = "The quick brown fox jumps over the lazy dog. Ünïcode too.\n".encode() * 3
    path = tmp_path / "book.txt"
    path.write_bytes(data)
    spec = DatasetSpec("text", {"path": str(path), "context": 16, "stride": 5}, validation_fraction=0.0)
    dataset = load(spec, "decoder-lm", {"context": 32})
    x, y = dataset.train.tensors
    count = (len(data) - 17) // 5 + 1
    assert x.shape == y.shape == (count, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert dataset.info.fingerprint == hashlib.sha256(data).hexdigest()
    assert dataset.info.num_classes == 256 and dataset.info.sample_shape == (16,)
    expected_x, expected_y = windows(data, 16, 5)
    starts = {bytes(row) for row in expected_x.astype(np.uint8)}
    assert {bytes(row) for row in x.numpy().astype(np.uint8)} == starts
    for start in range(0, count * 5, 5):
        assert bytes(expected_y[start // 5].astype(np.uint8)) == data[start + 1 : start + 17]


def test_builtin_corpus_defaults_to_the_architecture_context() -> None:
    dataset: Dataset = load(DatasetSpec("text"), "decoder-lm", {"context": 64})
    assert dataset.info.sample_shape == (64,) and dataset.info.num_train > 10
    assert validate(DatasetSpec("text", {"corpus": "proverbs"}), "decoder-lm", {}).num_train >= 1


def test_bad_text_is_rejected(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1") * 100)
    with pytest.raises(InvalidArgument, match="not UTF-8"):
        validate(DatasetSpec("text", {"path": str(latin1)}), "decoder-lm", {})
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(InvalidArgument, match="needs at least 129"):
        validate(DatasetSpec("text", {"path": str(short)}), "decoder-lm", {})
    with pytest.raises(InvalidArgument, match="either path or corpus"):
        validate(DatasetSpec("text", {"path": str(short), "corpus": "all"}), "decoder-lm", {})
    with pytest.raises(InvalidArgument, match="token ids up to"):
        validate(DatasetSpec("text"), "decoder-lm", {"vocab_size": 64, "width": 8, "heads": 2})
