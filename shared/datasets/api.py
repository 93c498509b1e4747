"""Validating a dataset spec at submit time and loading it on workers."""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from shared.artifacts import ArtifactError, get_architecture
from shared.datasets.builtin import digits, synthetic_classification, synthetic_sequences
from shared.datasets.files import user_file
from shared.datasets.fit import Fitted, check_kind, fit
from shared.datasets.options import SEED_MAX
from shared.datasets.paths import resolve_root
from shared.datasets.source import FEATURES, TEXT, TOKENS, Source
from shared.datasets.spec import Dataset, DatasetInfo, DatasetSpec
from shared.datasets.text import text
from shared.errors import FailedPrecondition, InvalidArgument

__all__ = ["DATASETS", "load", "validate"]

# name -> (source, what it can provide: checked before any data is generated or read).
_SOURCES: dict[str, tuple[Source, frozenset[str]]] = {
    "digits": (digits, frozenset({FEATURES})),
    "synthetic-classification": (synthetic_classification, frozenset({FEATURES})),
    "synthetic-sequences": (synthetic_sequences, frozenset({TOKENS})),
    "text": (text, frozenset({TEXT})),
    "file": (user_file, frozenset({FEATURES, TOKENS})),
}

#: Names of the datasets a spec may name.
DATASETS: tuple[str, ...] = tuple(sorted(_SOURCES))

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class _Prepared:
    fitted: Fitted
    info: DatasetInfo


def validate(
    spec: DatasetSpec, architecture: str, arguments: Mapping[str, Any] | None, *, data_root: PathLike | None = None
) -> DatasetInfo:
    """Checks everything about a dataset that can be known before training, as a scheduler must at submit.

    The data is generated or read in full (labels and token ids must be checked), so a file's layout, its
    fit to the architecture and its fingerprint are settled here, not on a worker an hour later.

    Args:
        spec: The dataset.
        architecture: Zoo architecture id the job trains.
        arguments: The architecture's arguments (defaults are filled in as the zoo does).
        data_root: Directory that user file paths are relative to and confined to. Services must pass their
            data directory: without one any path the process can read is accepted.

    Returns:
        Sizes, sample shape, class count and content fingerprint; record the fingerprint in the model's
        lineage and pass it to :func:`load` so workers train on exactly what was validated.

    Raises:
        InvalidArgument: Naming the offending field (``dataset.*``, ``architecture`` or ``arguments.*``).
        FailedPrecondition: If a built-in dataset's dependency is missing on this machine.
    """
    if spec.name in _GENERATED:
        key = _generated_key(spec, architecture, arguments)
        if key is not None:
            return _validate_generated(key)
    return _prepare(spec, architecture, arguments, data_root).info


# Built-in datasets that no file feeds: the same request always gets the same answer, so a scheduler that
# validates thousands of submissions computes it once (reading digits and drawing 1M synthetic samples
# took most of a submission's time). Files are read every time: they may change.
_GENERATED = frozenset({"digits", "synthetic-classification", "synthetic-sequences"})
_GeneratedKey = tuple[str, str, float, int, str, str]


def _generated_key(spec: DatasetSpec, architecture: str, arguments: Mapping[str, Any] | None) -> _GeneratedKey | None:
    try:
        options = json.dumps(dict(spec.options), sort_keys=True)
        resolved = json.dumps(dict(arguments or {}), sort_keys=True)
        return (spec.name, options, float(spec.validation_fraction), int(spec.seed), str(architecture), resolved)
    except (TypeError, ValueError, OverflowError):
        return None  # something that is not plain JSON: validated the long way (and refused there)


@functools.lru_cache(maxsize=256)
def _validate_generated(key: _GeneratedKey) -> DatasetInfo:
    name, options, fraction, seed, architecture, arguments = key
    spec = DatasetSpec(name=name, options=json.loads(options), validation_fraction=fraction, seed=seed)
    return _prepare(spec, architecture, json.loads(arguments), None).info


def load(
    spec: DatasetSpec,
    architecture: str,
    arguments: Mapping[str, Any] | None,
    *,
    data_root: PathLike | None = None,
    expected_fingerprint: str | None = None,
) -> Dataset:
    """Loads a dataset shaped for an architecture and splits it into training and validation sets.

    ``x`` is float32 for ``mlp`` (``[-1, in_features]``) and ``cnn`` (``[-1, C, H, W]``), int64 token ids
    for sequence classifiers and ``decoder-lm``; ``y`` is int64. The split is a permutation drawn from
    ``spec.seed`` (``numpy.random.RandomState``, frozen across NumPy releases): its first
    ``num_validation`` samples are the validation set, the rest the training set in that order, so every
    worker computes the same split.

    Args:
        spec: The dataset.
        architecture: Zoo architecture id.
        arguments: The architecture's arguments.
        data_root: As for :func:`validate`.
        expected_fingerprint: The fingerprint :func:`validate` returned at submit time, if any.

    Raises:
        InvalidArgument: As :func:`validate`.
        FailedPrecondition: If the content no longer matches ``expected_fingerprint`` (e.g. the file was
            replaced after the job was submitted), or a dependency is missing.
    """
    prepared = _prepare(spec, architecture, arguments, data_root)
    info = prepared.info
    if expected_fingerprint is not None and info.fingerprint != expected_fingerprint:
        raise FailedPrecondition(
            f"dataset '{spec.name}' changed since the job was submitted (fingerprint {info.fingerprint[:12]}..., "
            f"expected {expected_fingerprint[:12]}...)",
            reason="DATASET_CHANGED",
        )
    order = torch.from_numpy(np.random.RandomState(spec.seed).permutation(info.num_train + info.num_validation))
    held_out, kept = order[: info.num_validation], order[info.num_validation :]
    x, y = prepared.fitted.x, prepared.fitted.y
    return Dataset(info=info, train=TensorDataset(x[kept], y[kept]), validation=TensorDataset(x[held_out], y[held_out]))


def _check_spec(spec: DatasetSpec) -> tuple[Source, frozenset[str]]:
    if not isinstance(spec, DatasetSpec):
        raise InvalidArgument.field("dataset", f"must be a DatasetSpec, got {type(spec).__name__}")
    if not isinstance(spec.name, str) or spec.name not in _SOURCES:
        raise InvalidArgument.field("dataset.name", f"unknown dataset {spec.name!r} (known: {', '.join(DATASETS)})")
    if not isinstance(spec.options, Mapping) or not all(isinstance(key, str) for key in spec.options):
        raise InvalidArgument.field("dataset.options", "must be a map from option names to values")
    fraction = spec.validation_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise InvalidArgument.field("dataset.validation_fraction", f"must be a number in [0, 1), got {fraction!r}")
    if isinstance(spec.seed, bool) or not isinstance(spec.seed, int) or not 0 <= spec.seed <= SEED_MAX:
        raise InvalidArgument.field("dataset.seed", f"must be an integer in [0, {SEED_MAX}], got {spec.seed!r}")
    return _SOURCES[spec.name]


def _resolve_arguments(architecture: str, arguments: Mapping[str, Any] | None) -> dict[str, Any]:
    try:
        entry = get_architecture(architecture)
    except ArtifactError as exc:
        raise InvalidArgument.field("architecture", str(exc)) from None
    if arguments is not None and not isinstance(arguments, Mapping):
        raise InvalidArgument.field("arguments", f"must be an object, got {type(arguments).__name__}")
    try:
        return entry.resolve(dict(arguments or {}))
    except ArtifactError as exc:
        raise InvalidArgument.field("arguments", str(exc)) from None


def _split_sizes(spec: DatasetSpec, total: int) -> tuple[int, int]:
    # At least one validation sample whenever a fraction is asked for: a silent empty validation set would
    # report no validation loss at all. The epsilon keeps e.g. 0.29 * 100 from flooring to 28.
    held_out = max(1, math.floor(total * spec.validation_fraction + 1e-9)) if spec.validation_fraction > 0 else 0
    if total - held_out < 1:
        raise InvalidArgument.field(
            "dataset.validation_fraction",
            f"leaves no training samples: dataset '{spec.name}' has only {total} samples "
            f"and {held_out} are held out for validation",
        )
    return total - held_out, held_out


def _prepare(
    spec: DatasetSpec, architecture: str, arguments: Mapping[str, Any] | None, data_root: PathLike | None
) -> _Prepared:
    source, kinds = _check_spec(spec)
    resolved = _resolve_arguments(architecture, arguments)
    # Before generating or reading anything: a hopeless pairing (digits on a transformer) is reported
    # without reading a large file first.
    check_kind(spec.name, kinds, architecture)
    raw = source(spec.options, resolved, resolve_root(data_root))
    fitted = fit(raw, spec.name, architecture, resolved)
    num_train, num_validation = _split_sizes(spec, len(fitted.x))
    info = DatasetInfo(
        num_train=num_train,
        num_validation=num_validation,
        sample_shape=tuple(fitted.x.shape[1:]),
        num_classes=fitted.num_classes,
        fingerprint=raw.fingerprint,
    )
    return _Prepared(fitted, info)
