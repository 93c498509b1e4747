"""What every dataset source produces before it is shaped for an architecture, and shared limits."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FEATURES", "MAX_ELEMENTS", "MAX_FILE_BYTES", "TEXT", "TOKENS", "RawData", "Source"]

#: Largest user file read (npz, CSV or text). Files are read whole, because the fingerprint and the
#: parsed arrays must come from the very same bytes; beyond this a job should use a real data pipeline.
MAX_FILE_BYTES = 512 * 1024 * 1024

#: Largest array (elements) a source generates or decodes: 64M float32 is 256 MB, far above the datasets
#: this platform targets, and refusing at submit time beats an out-of-memory kill of every worker.
MAX_ELEMENTS = 64 * 1024 * 1024

# What a dataset can feed: flat/image features (mlp, cnn), token sequences with one label each (sequence
# classifiers), or next-token windows (decoder-lm).
FEATURES = "features"
TOKENS = "tokens"
TEXT = "text"


@dataclass(frozen=True)
class RawData:
    """A dataset's samples before they are shaped for an architecture.

    Attributes:
        x: Samples, ``[num_samples, ...]``.
        y: Labels ``[num_samples]`` int64 (text: next-byte targets ``[num_windows, context]``).
        fingerprint: Content fingerprint, see :class:`~shared.datasets.spec.DatasetInfo`.
        kinds: Which of :data:`FEATURES`, :data:`TOKENS`, :data:`TEXT` the data may be used as.
        num_classes: Labels lie in ``[0, num_classes)``.
        vocab_size: Declared token vocabulary when known up front; else derived from the largest id.
        field: The request field to blame when the content does not fit the architecture.
    """

    x: np.ndarray
    y: np.ndarray
    fingerprint: str
    kinds: frozenset[str]
    num_classes: int
    vocab_size: int | None
    field: str


#: ``(options, resolved architecture arguments, data root) -> RawData``; raises InvalidArgument.
Source = Callable[[Mapping[str, Any], dict[str, Any], Path | None], RawData]
