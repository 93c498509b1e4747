"""The ``"file"`` dataset: a user's ``.npz`` or CSV file (layouts in the package docstring)."""

from __future__ import annotations

import csv
import io
import math
import re
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import IO, Any

import numpy as np

from shared.datasets.fingerprint import fingerprint_bytes
from shared.datasets.options import StrOption, option_field, parse_options
from shared.datasets.paths import read_user_file
from shared.datasets.source import FEATURES, MAX_ELEMENTS, MAX_FILE_BYTES, TOKENS, RawData
from shared.errors import InvalidArgument

__all__ = ["user_file"]

_FIELD = option_field("path")
_LABEL = re.compile(r"[+-]?\d+")
_MAX_LABEL = 2**31 - 1
# What corrupt archives raise from zipfile, zlib and numpy's readers.
_CORRUPT = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)


def _bad(description: str) -> InvalidArgument:
    return InvalidArgument.field(_FIELD, description)


def user_file(options: Mapping[str, Any], arguments: dict[str, Any], data_root: Path | None) -> RawData:
    """Reads options ``path`` (required) and ``format`` (``npz`` or ``csv``; default from the extension).

    Raises:
        InvalidArgument: On bad options, a missing or unreadable file, or a wrong layout.
    """
    opts = parse_options("file", options, {"path": StrOption(None), "format": StrOption(None, ("npz", "csv"))})
    path = opts["path"]
    if path is None:
        raise _bad("is required for dataset 'file'")
    fmt = opts["format"] or PurePath(path).suffix.lower().lstrip(".")
    if fmt not in ("npz", "csv"):
        raise InvalidArgument.field(
            option_field("format"), f"cannot tell the format of {path!r} from its name; set it to npz or csv"
        )
    data = read_user_file(path, data_root)
    x, y = _read_npz(data) if fmt == "npz" else _read_csv(data)
    return RawData(
        x=x,
        y=y,
        fingerprint=fingerprint_bytes(data),
        kinds=frozenset({FEATURES, TOKENS}),
        num_classes=int(y.max()) + 1,
        vocab_size=None,
        field=_FIELD,
    )


def _check_member(member: IO[bytes], name: str, stored_size: int) -> None:
    # numpy allocates what an array header claims before reading the data, so a tiny forged file could
    # ask for terabytes; the claim must fit in what the archive actually stores.
    version = np.lib.format.read_magic(member)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(member)
    if dtype.hasobject:
        raise _bad(f'array "{name}" holds Python objects; only numeric arrays are accepted')
    if math.prod(shape) * dtype.itemsize > stored_size:
        raise _bad(f'array "{name}" claims shape {shape} but the file holds less data than that')


def _read_npz(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            # Only "x.npy" and "y.npy" count: np.load also answers "x" for a member named plain "x" (with its
            # raw bytes, not an array), so a name without the suffix must not pass for an array.
            arrays = [info for info in archive.infolist() if info.filename.endswith(".npy")]
            members = {info.filename.removesuffix(".npy"): info for info in arrays}
            missing = [name for name in ("x", "y") if name not in members]
            if missing:
                found = ", ".join(sorted(members)) or "none"
                raise _bad(
                    f'npz file has no array "{missing[0]}"; it needs "x" (samples) and "y" (integer labels) '
                    f"(arrays found: {found})"
                )
            if sum(info.file_size for info in members.values()) > MAX_FILE_BYTES:
                raise _bad(f"npz file unpacks to more than the limit of {MAX_FILE_BYTES:,} bytes")
            for name in ("x", "y"):
                with archive.open(members[name]) as member:
                    _check_member(member, name, members[name].file_size)
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            x, y = npz["x.npy"], npz["y.npy"]
    except InvalidArgument:
        raise
    except _CORRUPT as exc:
        raise _bad(f"is not a readable .npz file: {exc}") from None
    if x.dtype.kind not in "biuf":
        raise _bad(f'array "x" must be numeric, got dtype {x.dtype}')
    if y.dtype.kind not in "iu":
        raise _bad(f'array "y" must hold integer class labels, got dtype {y.dtype}')
    if x.ndim < 2 or math.prod(x.shape[1:]) == 0:
        raise _bad(f'array "x" must have shape [num_samples, features...], got shape {x.shape}')
    if y.ndim != 1:
        raise _bad(f'array "y" must have shape [num_samples], got shape {y.shape}')
    if len(x) != len(y):
        raise _bad(f'array "x" has {len(x)} samples but "y" has {len(y)}; they must match')
    if len(x) == 0:
        raise _bad('arrays "x" and "y" hold no samples')
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        sample = int(np.flatnonzero(~np.isfinite(x).reshape(len(x), -1).all(axis=1))[0])
        raise _bad(f'array "x" holds NaN or infinite values (first in sample {sample})')
    if int(y.min()) < 0 or int(y.max()) > _MAX_LABEL:
        sample = int(np.flatnonzero((y < 0) | (y > _MAX_LABEL))[0])
        raise _bad(f'array "y" holds label {int(y[sample])} at sample {sample}; labels must be in [0, {_MAX_LABEL}]')
    return x, y.astype(np.int64)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _read_csv(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        # utf-8-sig: spreadsheet programs often start CSV exports with a byte-order mark.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _bad(f"CSV file is not UTF-8 text (invalid byte at offset {exc.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next((row for row in reader if row), None)
    if header is None:
        raise _bad("CSV file is empty; it needs a header row, then one row per sample")
    if len(header) < 2:
        raise _bad("CSV header must name at least one feature column and, last, the label column")
    if all(_is_number(cell) for cell in header):
        raise _bad("CSV file's first row must be a header naming the columns, but it holds only numbers")
    names, width = header[:-1], len(header)
    features: list[list[float]] = []
    labels: list[int] = []
    try:
        for row in reader:
            if not row:  # blank lines carry no sample
                continue
            line = reader.line_num
            if len(row) != width:
                raise _bad(f"CSV line {line} has {len(row)} columns but the header has {width}")
            if (len(features) + 1) * len(names) > MAX_ELEMENTS:
                raise _bad(f"CSV file holds more than the limit of {MAX_ELEMENTS:,} feature values")
            features.append([_feature(cell, line, name) for name, cell in zip(names, row, strict=False)])
            labels.append(_label(row[-1], line, header[-1]))
    except csv.Error as exc:
        raise _bad(f"is not valid CSV (line {reader.line_num}): {exc}") from None
    if not labels:
        raise _bad("CSV file has a header but no sample rows")
    return np.asarray(features, dtype=np.float64), np.asarray(labels, dtype=np.int64)


def _feature(cell: str, line: int, column: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        raise _bad(f'CSV line {line}, column "{column}": {cell!r} is not a number') from None
    if not math.isfinite(value):
        raise _bad(f'CSV line {line}, column "{column}": {cell!r} is not a finite number')
    return value


def _label(cell: str, line: int, column: str) -> int:
    if not _LABEL.fullmatch(cell.strip()):
        raise _bad(f'CSV line {line}, label column "{column}": {cell!r} is not an integer class label')
    label = int(cell)
    if not 0 <= label <= _MAX_LABEL:
        raise _bad(f'CSV line {line}, label column "{column}": label {label} must be in [0, {_MAX_LABEL}]')
    return label
