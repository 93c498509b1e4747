"""Per-tenant rate limits: one tenant's burst must not take a shared mesh from the others.

Fixed windows per tenant and class of RPC (inference; management: what needs a developer or admin key),
kept in this process's memory (each server limits what it serves). The mesh's own services are not limited:
their calls are made on behalf of callers who were counted where they came in.
"""

from __future__ import annotations

import time

from limits import RateLimitItem, parse, storage, strategies

from shared.errors import ResourceExhausted
from shared.security.access import Access, Principal


def parse_limit(text: str) -> RateLimitItem:
    """``"100/second"``, ``"5000 per minute"``...: ValueError naming the text when it is none."""
    try:
        return parse(text)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a rate limit such as '100/second': {exc}") from None


class TenantStreams:
    """Streams (uploads, downloads, watches, generations) one tenant holds open on a server at once: a
    count per tenant, never more than ``limit``. The mesh's own services are not counted."""

    def __init__(self, limit: int | None) -> None:
        self._limit = limit
        self._open: dict[str, int] = {}

    def open(self, principal: Principal) -> str | None:
        """Count one more stream; returns the key to :meth:`close` with (None: not counted).

        Raises:
            ResourceExhausted: The tenant holds ``limit`` streams already.
        """
        if self._limit is None or principal.is_service:
            return None
        tenant = principal.tenant
        held = self._open.get(tenant, 0)
        if held >= self._limit:
            raise ResourceExhausted(
                f"tenant '{tenant}' has {held} streams open on this server, its limit; close one first",
                reason="TOO_MANY_STREAMS",
                retry_after_s=1.0,
            )
        self._open[tenant] = held + 1
        return tenant

    def close(self, tenant: str | None) -> None:
        if tenant is not None:
            left = self._open[tenant] - 1
            if left:
                self._open[tenant] = left
            else:
                del self._open[tenant]


class TenantLimits:
    """Token windows per tenant for inference and for management calls.

    Args:
        inference: Limit per tenant of inference RPCs (None: unlimited).
        management: Limit per tenant of RPCs that need a developer or admin key (None: unlimited).
    """

    def __init__(self, inference: str | None, management: str | None) -> None:
        self._limits = {
            Access.INFERENCE: None if inference is None else parse_limit(inference),
            Access.DEVELOPER: None if management is None else parse_limit(management),
            Access.ADMIN: None if management is None else parse_limit(management),
        }
        self._limiter = strategies.FixedWindowRateLimiter(storage.MemoryStorage())

    def check(self, principal: Principal, access: Access) -> None:
        """Count one call of ``principal`` to an RPC that needs ``access``.

        Raises:
            ResourceExhausted: The tenant is over its limit; ``retry_after_s`` says when the window resets.
        """
        if principal.is_service:
            return
        limit = self._limits.get(access)
        if limit is None or self._limiter.hit(limit, principal.tenant, access.value):
            return
        reset = self._limiter.get_window_stats(limit, principal.tenant, access.value).reset_time
        wait = max(reset - time.time(), 0.001)
        kind = "inference" if access is Access.INFERENCE else "management"
        raise ResourceExhausted(
            f"tenant '{principal.tenant}' is over its {kind} rate limit ({limit}); retry in {wait:.2f} s",
            reason="RATE_LIMITED",
            retry_after_s=wait,
        )
