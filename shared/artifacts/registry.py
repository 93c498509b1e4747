"""The architecture registry: what an architecture id means and how its arguments are checked.

``zoo`` registers the built-in architectures; import ``zoo`` (or the package) rather than this module
to see them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from shared.artifacts.argspec import ArgSpec, validate_arguments
from shared.artifacts.errors import ArtifactError
from shared.artifacts.signature import Signature

__all__ = ["Architecture", "architectures", "get_architecture", "register_architecture"]


@dataclass(frozen=True)
class Architecture:
    """One zoo entry.

    Attributes:
        id: Registry key, e.g. ``"mlp"``.
        description: One line for humans (CLI listings, API docs).
        params: Spec of every accepted argument.
        defaults: Default of every argument; see :meth:`default_arguments` for a safe copy.
        factory: Builds the module from fully validated arguments.
        signature_fn: Computes the signature from fully validated arguments.
        check: Optional cross-argument check (e.g. heads must divide width); raises ArtifactError.
    """

    id: str
    description: str
    params: Mapping[str, ArgSpec]
    defaults: Mapping[str, Any]
    factory: Callable[[dict[str, Any]], nn.Module]
    signature_fn: Callable[[dict[str, Any]], Signature]
    check: Callable[[dict[str, Any]], None] | None = None

    def default_arguments(self) -> dict[str, Any]:
        """Returns a fresh deep copy of the default arguments."""
        return copy.deepcopy(dict(self.defaults))

    def resolve(self, arguments: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Validates arguments and fills in defaults.

        Raises:
            ArtifactError: On unknown argument names, bad values or inconsistent combinations.
        """
        resolved = validate_arguments(self.id, dict(self.params), dict(self.defaults), arguments)
        if self.check is not None:
            self.check(resolved)
        return resolved

    def build(self, arguments: Mapping[str, Any] | None = None) -> nn.Module:
        """Builds the float32 module on the current default device (use ``with torch.device(...)``).

        Raises:
            ArtifactError: If the arguments are invalid or torch rejects them.
        """
        resolved = self.resolve(arguments)
        try:
            return self.factory(resolved)
        except (TypeError, ValueError, AssertionError) as exc:
            # The explicit checks should make this unreachable; it guards against combinations they miss
            # (torch asserts some, e.g. attention heads). RuntimeError is left alone: it includes
            # out-of-memory, which is the server's problem, not the client's.
            raise ArtifactError(f"architecture '{self.id}' rejected arguments {resolved}: {exc}") from None

    def signature(self, arguments: Mapping[str, Any] | None = None) -> Signature:
        """Returns the signature of the model these arguments build.

        Raises:
            ArtifactError: If the arguments are invalid.
        """
        return self.signature_fn(self.resolve(arguments))


_REGISTRY: dict[str, Architecture] = {}


def register_architecture(architecture: Architecture) -> None:
    """Adds an architecture to the zoo.

    Raises:
        ValueError: If the id is already taken (silently replacing an entry would change what existing
            artifacts mean).
    """
    if architecture.id in _REGISTRY:
        raise ValueError(f"architecture '{architecture.id}' is already registered")
    if set(architecture.params) != set(architecture.defaults):
        raise ValueError(f"architecture '{architecture.id}': params and defaults name different arguments")
    _REGISTRY[architecture.id] = architecture


def architectures() -> list[str]:
    """Returns the ids of all registered architectures, sorted."""
    return sorted(_REGISTRY)


def get_architecture(architecture_id: str) -> Architecture:
    """Looks an architecture up by id.

    Raises:
        ArtifactError: If no architecture has that id.
    """
    try:
        return _REGISTRY[architecture_id]
    except (KeyError, TypeError):
        raise ArtifactError(f"unknown architecture {architecture_id!r} (known: {', '.join(architectures())})") from None
