"""Opaque page tokens (AIP-158) bound to the filter of the request that got them."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from shared.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# Tokens this server issues are short; a longer one is not ours, and is refused before it is decoded
# (deeply nested JSON would otherwise exhaust the parser's recursion).
MAX_TOKEN_LENGTH = 1024
_INT64 = 2**63 - 1


@dataclass(frozen=True)
class PageRequest:
    """A validated page request: ``size`` items after the cursor ``after`` (None: from the start)."""

    size: int
    after: Any = None


def _fingerprint(query: dict[str, Any]) -> str:
    canonical = json.dumps(query, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def encode_token(after: Any, query: dict[str, Any]) -> str:
    """A token that resumes after ``after`` for the same ``query``."""
    payload = json.dumps({"a": after, "q": _fingerprint(query)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def parse_page(page_size: int, page_token: str, query: dict[str, Any], cursor_type: type = str) -> PageRequest:
    """Validate ``page_size``/``page_token`` of a list request whose filter is ``query``."""
    if page_size < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    if not page_token:
        return PageRequest(size=size)
    if len(page_token) > MAX_TOKEN_LENGTH:
        raise InvalidArgument.field("page_token", "is not a token this server issued")
    try:
        padded = page_token + "=" * (-len(page_token) % 4)
        payload = json.loads(base64.urlsafe_b64decode(padded.encode()))
        after, fingerprint = payload["a"], payload["q"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise InvalidArgument.field("page_token", "is not a token this server issued") from exc
    if not isinstance(after, cursor_type) or isinstance(after, bool):
        raise InvalidArgument.field("page_token", "is not a token this server issued")
    if isinstance(after, int) and not -_INT64 - 1 <= after <= _INT64:
        # Cursors are database integers: beyond int64 the query itself would fail.
        raise InvalidArgument.field("page_token", "is not a token this server issued")
    if fingerprint != _fingerprint(query):
        raise InvalidArgument.field("page_token", "was issued for a different filter")
    return PageRequest(size=size, after=after)
