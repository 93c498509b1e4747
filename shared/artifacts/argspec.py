"""Declarative checks for architecture arguments.

Arguments arrive from API clients as JSON, so every value is checked explicitly (type, range, length)
before it reaches a torch constructor; the upper bounds exist to refuse requests that would allocate
absurd amounts of memory rather than to limit sensible models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.artifacts.errors import ArtifactError

__all__ = ["ArgSpec", "ChoiceArg", "IntArg", "IntListArg", "validate_arguments"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class IntArg:
    """An integer in ``[minimum, maximum]``."""

    minimum: int
    maximum: int

    def describe(self) -> str:
        """Returns what a valid value looks like, for error messages."""
        return f"an integer in [{self.minimum}, {self.maximum}]"

    def check(self, value: Any) -> int:
        """Returns ``value`` if valid.

        Raises:
            ArtifactError: If it is not an integer in range (the caller adds the argument name).
        """
        if not _is_int(value) or not self.minimum <= value <= self.maximum:
            raise ArtifactError(f"must be {self.describe()}, got {value!r}")
        return int(value)


@dataclass(frozen=True)
class IntListArg:
    """A list of ``min_length`` to ``max_length`` integers, each in ``[minimum, maximum]``."""

    min_length: int
    max_length: int
    minimum: int
    maximum: int

    def describe(self) -> str:
        """Returns what a valid value looks like, for error messages."""
        return f"a list of {self.min_length} to {self.max_length} integers in [{self.minimum}, {self.maximum}]"

    def check(self, value: Any) -> list[int]:
        """Returns a copy of ``value`` as a list if valid (tuples are accepted).

        Raises:
            ArtifactError: If it is not such a list.
        """
        if (
            not isinstance(value, (list, tuple))
            or not self.min_length <= len(value) <= self.max_length
            or not all(_is_int(v) and self.minimum <= v <= self.maximum for v in value)
        ):
            raise ArtifactError(f"must be {self.describe()}, got {value!r}")
        # A fresh list, so callers mutating their input cannot change a validated manifest.
        return [int(v) for v in value]


@dataclass(frozen=True)
class ChoiceArg:
    """One of a fixed set of strings."""

    choices: tuple[str, ...]

    def describe(self) -> str:
        """Returns what a valid value looks like, for error messages."""
        return f"one of {', '.join(self.choices)}"

    def check(self, value: Any) -> str:
        """Returns ``value`` if it is one of the choices.

        Raises:
            ArtifactError: Otherwise.
        """
        if not isinstance(value, str) or value not in self.choices:
            raise ArtifactError(f"must be {self.describe()}, got {value!r}")
        return value


ArgSpec = IntArg | IntListArg | ChoiceArg


def validate_arguments(
    architecture: str, specs: dict[str, ArgSpec], defaults: dict[str, Any], arguments: object
) -> dict[str, Any]:
    """Checks client arguments against specs and fills in defaults.

    Args:
        architecture: Architecture id, for error messages.
        specs: Spec of every argument the architecture accepts.
        defaults: Default value of every argument (same keys as ``specs``).
        arguments: The client's arguments; any subset of ``specs``.

    Returns:
        A new dict with a validated value for every argument.

    Raises:
        ArtifactError: If ``arguments`` is not a mapping with string keys, names an unknown argument
            or holds an invalid value.
    """
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise ArtifactError(
            f"arguments of architecture '{architecture}' must be an object, got {type(arguments).__name__}"
        )
    unknown = sorted(str(name) for name in arguments if name not in specs)
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        raise ArtifactError(
            f"unknown argument{plural} {', '.join(repr(n) for n in unknown)} for architecture "
            f"'{architecture}' (known: {', '.join(sorted(specs))})"
        )
    resolved: dict[str, Any] = {}
    for name, spec in specs.items():
        value = arguments.get(name, defaults[name])
        try:
            resolved[name] = spec.check(value)
        except ArtifactError as exc:
            raise ArtifactError(f"architecture '{architecture}' argument '{name}' {exc}") from None
    return resolved
