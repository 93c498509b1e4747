"""The registry's access rules that depend on data: tenants own models, and some aliases are protected.

Who calls is decided by the servicer (from the authenticated principal) and passed in explicitly: a
``tenant`` scope (None: every tenant), the ``owner`` of what a call creates, and whether the caller may move
protected aliases. The core never reads credentials itself, so it stays testable without grpc.

The errors live here, in one place, so that the repository and the core raise byte-for-byte the same
NOT_FOUND for a model of another tenant as for a model that does not exist: a caller must not be able to
tell them apart.
"""

from __future__ import annotations

from collections.abc import Iterable

from shared.errors import AlreadyExists, NotFound, PermissionDenied
from shared.security.keys import GRANT_PROTECTED_ALIASES


def visible(owner: str, scope: str | None) -> bool:
    """Whether a model owned by ``owner`` exists for a caller whose scope is ``scope``."""
    return scope is None or owner == scope


def model_not_found(name: str) -> NotFound:
    return NotFound(f"model {name!r} not found", reason="MODEL_NOT_FOUND")


def model_exists(name: str) -> AlreadyExists:
    return AlreadyExists(f"model {name!r} already exists", reason="MODEL_EXISTS")


def name_taken(name: str) -> AlreadyExists:
    # Names are global (the gateway routes by name alone), as S3 bucket names are: the caller learns the
    # name is in use, never by whom.
    return AlreadyExists(
        f"model name {name!r} is taken: model names are unique across all tenants; choose another",
        reason="MODEL_NAME_TAKEN",
    )


class ProtectedAliases:
    """Aliases that only admins, the mesh's services and keys granted ``protected-aliases`` may set, move or
    delete: ``production`` by default."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(names)

    def check(self, alias: str, may_move_protected: bool) -> None:
        if alias in self.names and not may_move_protected:
            raise self.denied(alias)

    def held_back(self, may_move_protected: bool) -> frozenset[str]:
        """The aliases this caller may not remove (deleting a model with ``force`` removes its aliases)."""
        return frozenset() if may_move_protected else self.names

    @staticmethod
    def denied(alias: str) -> PermissionDenied:
        return PermissionDenied(
            f"alias {alias!r} is protected: setting, moving or deleting it needs the admin role"
            f" or the {GRANT_PROTECTED_ALIASES!r} grant",
            reason="PROTECTED_ALIAS",
        )
