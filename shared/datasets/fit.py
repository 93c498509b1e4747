"""Checking that a dataset fits an architecture's input, and shaping it to that input."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shared.datasets.source import FEATURES, TEXT, TOKENS, RawData
from shared.errors import InvalidArgument

__all__ = ["ARCHITECTURE_KINDS", "Fitted", "check_kind", "fit"]

#: What each zoo architecture consumes; an architecture missing here cannot be trained on a dataset yet.
ARCHITECTURE_KINDS: dict[str, str] = {
    "mlp": FEATURES,
    "cnn": FEATURES,
    "lstm-classifier": TOKENS,
    "transformer-classifier": TOKENS,
    "decoder-lm": TEXT,
}

_KIND_NAMES = {FEATURES: "feature vectors or images", TOKENS: "token sequences", TEXT: "text"}


@dataclass(frozen=True)
class Fitted:
    """A dataset shaped for an architecture: ``x`` (float32 features or int64 tokens) and int64 ``y``."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int


def check_kind(dataset: str, kinds: frozenset[str], architecture: str) -> None:
    """Rejects a dataset/architecture pair that can never fit, before any data is read.

    Raises:
        InvalidArgument: If the dataset cannot provide what the architecture consumes.
    """
    kind = ARCHITECTURE_KINDS.get(architecture)
    if kind is None:
        raise InvalidArgument.field(
            "architecture",
            f"'{architecture}' cannot be trained on a dataset (trainable: {', '.join(sorted(ARCHITECTURE_KINDS))})",
        )
    if kind not in kinds:
        provides = " or ".join(_KIND_NAMES[k] for k in sorted(kinds))
        fits = ", ".join(sorted(a for a, k in ARCHITECTURE_KINDS.items() if k in kinds))
        raise InvalidArgument.field(
            "dataset.name",
            f"dataset '{dataset}' provides {provides}, but architecture '{architecture}' takes "
            f"{_KIND_NAMES[kind]}; it fits: {fits}",
        )


def fit(raw: RawData, dataset: str, architecture: str, arguments: dict[str, Any]) -> Fitted:
    """Checks ``raw`` against the architecture's resolved arguments and shapes it for the model input.

    Raises:
        InvalidArgument: Naming the architecture argument (or the dataset field) that does not fit.
    """
    check_kind(dataset, raw.kinds, architecture)
    if architecture == "mlp":
        return _fit_mlp(raw, dataset, arguments)
    if architecture == "cnn":
        return _fit_cnn(raw, dataset, arguments)
    if architecture == "decoder-lm":
        _check_vocab(raw, dataset, architecture, arguments["vocab_size"], raw.vocab_size or 0)
        return Fitted(
            torch.from_numpy(raw.x.astype(np.int64)), torch.from_numpy(raw.y.astype(np.int64)), raw.num_classes
        )
    return _fit_tokens(raw, dataset, architecture, arguments)


def _labels(raw: RawData, dataset: str, architecture: str, name: str, limit: int) -> torch.Tensor:
    if raw.num_classes > limit:
        raise InvalidArgument.field(
            f"arguments.{name}",
            f"is {limit} but dataset '{dataset}' has labels up to {raw.num_classes - 1}; "
            f"architecture '{architecture}' needs {name} >= {raw.num_classes}",
        )
    return torch.from_numpy(raw.y.astype(np.int64))


def _features(raw: RawData, shape: tuple[int, ...]) -> torch.Tensor:
    # Copied so the tensors own their memory (numpy may hand back read-only views of file buffers).
    return torch.from_numpy(np.array(raw.x, dtype=np.float32).reshape((len(raw.x), *shape)))


def _fit_mlp(raw: RawData, dataset: str, arguments: dict[str, Any]) -> Fitted:
    shape = raw.x.shape[1:]
    features, wanted = math.prod(shape), arguments["in_features"]
    if features != wanted:
        raise InvalidArgument.field(
            "arguments.in_features",
            f"is {wanted} but dataset '{dataset}' samples have {features} features (shape {shape})",
        )
    y = _labels(raw, dataset, "mlp", "out_features", arguments["out_features"])
    return Fitted(_features(raw, (features,)), y, raw.num_classes)


def _fit_cnn(raw: RawData, dataset: str, arguments: dict[str, Any]) -> Fitted:
    channels, size = arguments["in_channels"], arguments["image_size"]
    wanted = (channels, size, size)
    shape = raw.x.shape[1:]
    # Accepted: [C, H, W] as is, [H, W] for one channel, or flat vectors of C * H * W values (CSV rows).
    fits = shape == wanted or (shape == (size, size) and channels == 1) or shape == (math.prod(wanted),)
    if not fits:
        square = len(shape) in (2, 3) and shape[-1] == shape[-2]
        if square and shape[-2:] != (size, size):
            field = "arguments.image_size"
        elif square:  # right size, so the channel count is what differs
            field = "arguments.in_channels"
        else:
            field = raw.field
        raise InvalidArgument.field(
            field,
            f"architecture 'cnn' with in_channels={channels} and image_size={size} takes samples of shape "
            f"{wanted} (or {math.prod(wanted)} flat values), but dataset '{dataset}' samples have shape {shape}",
        )
    y = _labels(raw, dataset, "cnn", "num_classes", arguments["num_classes"])
    return Fitted(_features(raw, wanted), y, raw.num_classes)


def _check_vocab(raw: RawData, dataset: str, architecture: str, limit: int, needed: int) -> None:
    if needed > limit:
        raise InvalidArgument.field(
            "arguments.vocab_size",
            f"is {limit} but dataset '{dataset}' has token ids up to {needed - 1}; "
            f"architecture '{architecture}' needs vocab_size >= {needed}",
        )


def _fit_tokens(raw: RawData, dataset: str, architecture: str, arguments: dict[str, Any]) -> Fitted:
    x = raw.x
    if x.ndim != 2:
        raise InvalidArgument.field(
            raw.field,
            f"architecture '{architecture}' takes token sequences of shape [num_samples, length], "
            f"but dataset '{dataset}' samples have shape {x.shape[1:]}",
        )
    if x.dtype.kind not in "iub" and not np.array_equal(x, np.floor(x)):
        raise InvalidArgument.field(
            raw.field, f"architecture '{architecture}' takes integer token ids, but dataset '{dataset}' has fractions"
        )
    if int(x.min()) < 0:
        raise InvalidArgument.field(
            raw.field, f"architecture '{architecture}' takes token ids >= 0, but dataset '{dataset}' has {int(x.min())}"
        )
    _check_vocab(raw, dataset, architecture, arguments["vocab_size"], raw.vocab_size or int(x.max()) + 1)
    if architecture == "transformer-classifier" and x.shape[1] > arguments["seq_len"]:
        raise InvalidArgument.field(
            "arguments.seq_len",
            f"is {arguments['seq_len']} but dataset '{dataset}' sequences have {x.shape[1]} tokens",
        )
    y = _labels(raw, dataset, architecture, "num_classes", arguments["num_classes"])
    return Fitted(torch.from_numpy(x.astype(np.int64)), y, raw.num_classes)
