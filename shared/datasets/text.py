"""The ``"text"`` dataset: byte-level next-token windows for the ``decoder-lm`` architecture.

Text is used as its raw UTF-8 bytes (vocabulary 256, as the zoo's byte-level decoder expects). Window
``i`` starts at byte ``i * stride``: ``x`` is ``context`` bytes from there and ``y`` the same bytes
shifted by one, so ``y[i, t]`` is the byte that follows ``x[i, t]``. With the default ``stride`` equal
to ``context`` inputs do not overlap; a smaller stride gives more windows, but overlapping windows put
the same text on both sides of the train/validation split.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from shared.datasets.corpus import CORPORA
from shared.datasets.fingerprint import fingerprint_bytes
from shared.datasets.options import IntOption, StrOption, option_field, parse_options
from shared.datasets.paths import read_user_file
from shared.datasets.source import MAX_ELEMENTS, TEXT, RawData
from shared.errors import InvalidArgument

__all__ = ["BYTE_VOCAB", "text", "windows"]

#: Distinct byte values: the vocabulary (and class count) of byte-level text.
BYTE_VOCAB = 256

_DEFAULT_CORPUS = "all"


def windows(data: bytes, context: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Cuts bytes into next-token windows.

    Returns:
        ``(x, y)``, both int64 ``[num_windows, context]`` with ``y[:, t] == data[start + t + 1]`` where
        ``x[:, t] == data[start + t]``; trailing bytes that do not fill a window are dropped.
    """
    tokens = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    count = (len(tokens) - context - 1) // stride + 1 if len(tokens) > context else 0
    chunks = tokens[(np.arange(count) * stride)[:, None] + np.arange(context + 1)]
    return np.ascontiguousarray(chunks[:, :-1]), np.ascontiguousarray(chunks[:, 1:])


def text(options: Mapping[str, Any], arguments: dict[str, Any], data_root: Path | None) -> RawData:
    """Reads options ``corpus`` (a built-in name, default ``"all"``) or ``path`` (a UTF-8 text file),
    ``context`` (window length, default and maximum the architecture's ``context``) and ``stride``
    (default ``context``).

    Raises:
        InvalidArgument: On bad options, text that is not UTF-8, or text too short for two windows.
    """
    opts = parse_options(
        "text",
        options,
        {
            "corpus": StrOption(None, tuple(CORPORA)),
            "path": StrOption(None),
            "context": IntOption(None, 1, 8192),
            "stride": IntOption(None, 1, 8192),
        },
    )
    if opts["corpus"] is not None and opts["path"] is not None:
        raise InvalidArgument.field(option_field("path"), "give either path or corpus, not both")
    limit = arguments["context"]
    context = limit if opts["context"] is None else opts["context"]
    if context > limit:
        raise InvalidArgument.field(
            option_field("context"), f"is {context} but the architecture's context is only {limit}"
        )
    stride = context if opts["stride"] is None else opts["stride"]
    if opts["path"] is not None:
        field = option_field("path")
        data = read_user_file(opts["path"], data_root)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgument.field(field, f"is not UTF-8 text (invalid byte at offset {exc.start})") from None
    else:
        field = option_field("corpus")
        data = CORPORA[opts["corpus"] or _DEFAULT_CORPUS].encode("utf-8")
    if len(data) <= context:
        raise InvalidArgument.field(
            field, f"text has {len(data)} bytes; a window of context {context} needs at least {context + 1}"
        )
    if ((len(data) - context - 1) // stride + 1) * context > MAX_ELEMENTS:
        raise InvalidArgument.field(
            option_field("stride"), f"{stride} cuts the text into more than {MAX_ELEMENTS:,} tokens of windows"
        )
    x, y = windows(data, context, stride)
    return RawData(
        x=x,
        y=y,
        fingerprint=fingerprint_bytes(data),
        kinds=frozenset({TEXT}),
        num_classes=BYTE_VOCAB,
        vocab_size=int(max(x.max(), y.max())) + 1,
        field=field,
    )
