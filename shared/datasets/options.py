"""Typed, bounded dataset options.

Options come from clients as JSON (where every number may be a float) or from string-only maps, so an
integer option accepts ``16``, ``16.0`` and ``"16"`` but never ``16.5`` or ``True``; bounds keep a
request from allocating absurd amounts of memory.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.errors import InvalidArgument

__all__ = ["SEED_MAX", "FloatOption", "IntOption", "Option", "StrOption", "option_field", "parse_options"]

#: Seeds feed ``numpy.random.RandomState``, which takes 32-bit seeds.
SEED_MAX = 2**32 - 1

_INTEGER = re.compile(r"[+-]?\d+")


def option_field(name: str) -> str:
    """Returns the request field naming one option, for :meth:`InvalidArgument.field`."""
    return f"dataset.options.{name}"


@dataclass(frozen=True)
class IntOption:
    """An integer in ``[minimum, maximum]``; ``default`` None makes it optional with no value."""

    default: int | None
    minimum: int
    maximum: int

    def parse(self, name: str, value: object) -> int:
        """Returns the value as an int.

        Raises:
            InvalidArgument: If it is not an integer in range.
        """
        parsed: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            parsed = value
        elif isinstance(value, float) and value.is_integer():
            parsed = int(value)
        elif isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
            parsed = int(value.strip())
        if parsed is None or not self.minimum <= parsed <= self.maximum:
            raise InvalidArgument.field(
                option_field(name), f"must be an integer in [{self.minimum}, {self.maximum}], got {value!r}"
            )
        return parsed


@dataclass(frozen=True)
class FloatOption:
    """A finite number in ``[minimum, maximum]``."""

    default: float | None
    minimum: float
    maximum: float

    def parse(self, name: str, value: object) -> float:
        """Returns the value as a float.

        Raises:
            InvalidArgument: If it is not a finite number in range.
        """
        parsed: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parsed = float(value)
        elif isinstance(value, str):
            try:
                parsed = float(value.strip())
            except ValueError:
                parsed = None
        if parsed is None or not math.isfinite(parsed) or not self.minimum <= parsed <= self.maximum:
            raise InvalidArgument.field(
                option_field(name), f"must be a number in [{self.minimum}, {self.maximum}], got {value!r}"
            )
        return parsed


@dataclass(frozen=True)
class StrOption:
    """A non-empty string, optionally one of ``choices``."""

    default: str | None
    choices: tuple[str, ...] = ()

    def parse(self, name: str, value: object) -> str:
        """Returns the value.

        Raises:
            InvalidArgument: If it is not a non-empty string (among the choices, if any).
        """
        if not isinstance(value, str) or not value:
            raise InvalidArgument.field(option_field(name), f"must be a non-empty string, got {value!r}")
        if self.choices and value not in self.choices:
            raise InvalidArgument.field(option_field(name), f"must be one of {', '.join(self.choices)}, got {value!r}")
        return value


Option = IntOption | FloatOption | StrOption


def parse_options(dataset: str, options: Mapping[str, Any], specs: Mapping[str, Option]) -> dict[str, Any]:
    """Checks a dataset's options and fills in defaults.

    Args:
        dataset: Dataset name, for messages.
        options: The client's options.
        specs: Every option the dataset accepts.

    Returns:
        A value for every option in ``specs``: the parsed client value, else the default (possibly None).

    Raises:
        InvalidArgument: On an unknown option or a bad value, naming the option.
    """
    unknown = sorted(str(name) for name in options if name not in specs)
    if unknown:
        known = ", ".join(sorted(specs)) or "none"
        raise InvalidArgument.field(
            option_field(unknown[0]), f"unknown option for dataset '{dataset}' (known options: {known})"
        )
    return {name: spec.parse(name, options[name]) if name in options else spec.default for name, spec in specs.items()}
