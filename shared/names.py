"""Validation of identifiers that clients send.

Names are checked against strict patterns before they are used anywhere, so nothing a client sends can
become a path, a SQL fragment or a log-forging string.
"""

from __future__ import annotations

import re

from shared.errors import InvalidArgument

RESOURCE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
# Aliases start with a letter so that "3" is always a version number, never an alias.
ALIAS_NAME = re.compile(r"^[a-z][a-z0-9._-]{0,62}$")
TAG_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
RESERVED_ALIASES = frozenset({"latest"})
MAX_TAG_VALUE = 256
# Version numbers and counters travel as int64 on the wire and in SQL.
MAX_INT64 = 2**63 - 1
MAX_TAGS = 64


def _describe(value: str) -> str:
    shown = value if len(value) <= 40 else value[:37] + "..."
    return repr(shown)


def check_name(value: str, field: str = "name") -> str:
    """Return ``value`` when it is a valid resource name, else raise InvalidArgument."""
    if not value:
        raise InvalidArgument.field(field, "must not be empty")
    if not RESOURCE_NAME.fullmatch(value):
        raise InvalidArgument.field(
            field,
            f"{_describe(value)} is not a valid name: use 1-63 characters of a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit",
        )
    return value


def check_alias(value: str, field: str = "alias") -> str:
    """Return ``value`` when it is a valid alias name, else raise InvalidArgument."""
    if not value:
        raise InvalidArgument.field(field, "must not be empty")
    if not ALIAS_NAME.fullmatch(value) or value in RESERVED_ALIASES:
        raise InvalidArgument.field(
            field,
            f"{_describe(value)} is not a valid alias: use 1-63 characters of a-z, 0-9, '.', '_' or '-', "
            "starting with a letter, and not 'latest'",
        )
    return value


def check_tags(tags: dict[str, str], field: str = "tags") -> dict[str, str]:
    """Return ``tags`` when every key and value is acceptable, else raise InvalidArgument."""
    if len(tags) > MAX_TAGS:
        raise InvalidArgument.field(field, f"at most {MAX_TAGS} tags are allowed, got {len(tags)}")
    for key, value in tags.items():
        if not TAG_KEY.fullmatch(key):
            raise InvalidArgument.field(f"{field}[{key!r}]", "tag keys use 1-63 characters of A-Z, a-z, 0-9, ._/-")
        if len(value) > MAX_TAG_VALUE or not value.isprintable():
            raise InvalidArgument.field(
                f"{field}[{key!r}]", f"tag values are printable and at most {MAX_TAG_VALUE} characters"
            )
    return dict(tags)


def check_sha256(value: str, field: str = "sha256") -> str:
    """Return a lower-case hex sha256, else raise InvalidArgument."""
    if not SHA256_HEX.fullmatch(value):
        raise InvalidArgument.field(field, "must be 64 lower-case hex characters")
    return value


def version_number(text: str, field: str = "version") -> int | None:
    """The version number ``text`` names, or None when it is no number (empty, an alias).

    Only ASCII digits make a number: ``str.isdigit`` also accepts other scripts' digits and superscripts,
    which ``int`` then takes or rejects with a ValueError. Raises InvalidArgument for 0 or beyond int64.
    """
    if not text or not (text.isascii() and text.isdigit()):
        return None
    if len(text) > 19 or int(text) > MAX_INT64:
        raise InvalidArgument.field(field, f"{_describe(text)} is beyond the largest version number ({MAX_INT64})")
    number = int(text)
    if number < 1:
        raise InvalidArgument.field(field, "version numbers start at 1")
    return number
