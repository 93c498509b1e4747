"""Built-in datasets that need no files: scikit-learn's digits and two synthetic generators.

Synthetic data is drawn from ``numpy.random.RandomState``: NumPy freezes its streams for compatibility
(``Generator`` streams may change between releases), so the same seed gives the same data, and the same
fingerprint, on every worker and every NumPy version.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from shared.datasets.fingerprint import fingerprint_arrays
from shared.datasets.options import SEED_MAX, FloatOption, IntOption, option_field, parse_options
from shared.datasets.source import FEATURES, MAX_ELEMENTS, TOKENS, RawData
from shared.errors import FailedPrecondition, InvalidArgument

__all__ = ["digits", "synthetic_classification", "synthetic_sequences"]

_SAMPLES = IntOption(1000, 2, 1_000_000)
_CLASSES = IntOption(2, 2, 1000)
_SEED = IntOption(0, 0, SEED_MAX)


def _check_size(num_samples: int, per_sample: int) -> None:
    if num_samples * per_sample > MAX_ELEMENTS:
        raise InvalidArgument.field(
            option_field("num_samples"),
            f"{num_samples} samples of {per_sample} values exceed the limit of {MAX_ELEMENTS:,} values",
        )


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray, str]:
    """The digits arrays and fingerprint, read once per process: scikit-learn re-reads and parses its gzipped
    CSV on every call (about 50 ms of CPU), which the scheduler paid on every submission it validated."""
    try:
        # Imported here: scikit-learn is slow to import and only this dataset needs it.
        from sklearn.datasets import load_digits
    except ImportError:
        raise FailedPrecondition("dataset 'digits' needs scikit-learn, which is not installed here") from None
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64)
    target = np.asarray(bunch.target, dtype=np.int64)
    return (images / 16.0).astype(np.float32), target, fingerprint_arrays(images, target)


def digits(options: Mapping[str, Any], arguments: dict[str, Any], data_root: Path | None) -> RawData:
    """scikit-learn's 1797 8x8 handwritten digits (ten classes), shipped with scikit-learn.

    ``x`` is ``[1797, 8, 8]`` float32 scaled from the 0..16 grey levels to [0, 1]; the fingerprint covers
    the unscaled arrays exactly as scikit-learn ships them.

    Raises:
        InvalidArgument: If any option is given (digits has none).
        FailedPrecondition: If scikit-learn is not installed where this runs.
    """
    parse_options("digits", options, {})
    x, y, fingerprint = _digits()
    return RawData(
        # Copies: the cached arrays are shared by every caller in this process.
        x=x.copy(),
        y=y.copy(),
        fingerprint=fingerprint,
        kinds=frozenset({FEATURES}),
        num_classes=10,
        vocab_size=None,
        field="dataset.name",
    )


def synthetic_classification(options: Mapping[str, Any], arguments: dict[str, Any], data_root: Path | None) -> RawData:
    """Gaussian blobs: one centre per class drawn from N(0, 1) per feature, samples N(centre, cluster_std).

    Options: ``num_samples`` (1000), ``num_features`` (16), ``num_classes`` (2), ``cluster_std`` (0.5,
    smaller is easier), ``seed`` (0). Classes are balanced (sample ``i`` has label ``i % num_classes``).

    Raises:
        InvalidArgument: On bad options.
    """
    opts = parse_options(
        "synthetic-classification",
        options,
        {
            "num_samples": _SAMPLES,
            "num_features": IntOption(16, 1, 65536),
            "num_classes": _CLASSES,
            "cluster_std": FloatOption(0.5, 1e-6, 100.0),
            "seed": _SEED,
        },
    )
    n, f, k = opts["num_samples"], opts["num_features"], opts["num_classes"]
    _check_size(n, f)
    rng = np.random.RandomState(opts["seed"])
    centres = rng.standard_normal((k, f))
    y = np.arange(n, dtype=np.int64) % k
    x = (centres[y] + opts["cluster_std"] * rng.standard_normal((n, f))).astype(np.float32)
    return RawData(
        x=x,
        y=y,
        fingerprint=fingerprint_arrays(x, y),
        kinds=frozenset({FEATURES}),
        num_classes=k,
        vocab_size=None,
        field="dataset.name",
    )


def synthetic_sequences(options: Mapping[str, Any], arguments: dict[str, Any], data_root: Path | None) -> RawData:
    """Uniform random token sequences labelled by their majority vocabulary band.

    The vocabulary is cut into ``num_classes`` contiguous bands (token ``t`` is in band
    ``t * num_classes // vocab_size``); a sequence's label is the band with the most tokens, ties going to
    the lowest band. Counting is what an LSTM or a mean-pooling transformer learns easily, so small models
    reach high accuracy. Options: ``num_samples`` (1000), ``seq_len`` (16), ``vocab_size`` (16),
    ``num_classes`` (2), ``seed`` (0).

    Raises:
        InvalidArgument: On bad options, or fewer tokens than classes.
    """
    opts = parse_options(
        "synthetic-sequences",
        options,
        {
            "num_samples": _SAMPLES,
            "seq_len": IntOption(16, 1, 8192),
            "vocab_size": IntOption(16, 2, 1 << 20),
            "num_classes": _CLASSES,
            "seed": _SEED,
        },
    )
    n, length, vocab, k = opts["num_samples"], opts["seq_len"], opts["vocab_size"], opts["num_classes"]
    if k > vocab:
        raise InvalidArgument.field(
            option_field("num_classes"), f"is {k} but vocab_size {vocab} gives fewer than one token per class"
        )
    _check_size(n, length)
    x = np.random.RandomState(opts["seed"]).randint(0, vocab, size=(n, length)).astype(np.int64)
    bands = x * k // vocab
    # Per-row band counts in one bincount: row i's band b lands in bin i * k + b.
    counts = np.bincount((np.arange(n)[:, None] * k + bands).ravel(), minlength=n * k).reshape(n, k)
    y = counts.argmax(axis=1).astype(np.int64)
    return RawData(
        x=x,
        y=y,
        fingerprint=fingerprint_arrays(x, y),
        kinds=frozenset({TOKENS}),
        num_classes=k,
        vocab_size=vocab,
        field="dataset.name",
    )
