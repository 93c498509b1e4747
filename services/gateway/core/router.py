"""Least outstanding requests with the power of two choices, counted by this gateway."""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence

from services.gateway.core.model import Endpoint


class Router:
    """Picks a replica: of two drawn at random, the one with fewer requests outstanding from here.

    Two random choices avoid the herd that "always the least loaded" causes when the counts are stale,
    and cost O(1) per request.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._outstanding: dict[str, int] = {}
        self._rng = rng or random.Random()

    def pick(self, endpoints: Sequence[Endpoint], excluded: Collection[str] | None = None) -> Endpoint | None:
        """The endpoint to use, or None when none is left (after ``excluded`` addresses)."""
        if excluded:
            endpoints = [e for e in endpoints if e.address not in excluded]
        count = len(endpoints)
        if count == 0:
            return None
        if count == 1:
            return endpoints[0]
        first, second = self._rng.sample(range(count), 2)
        a, b = endpoints[first], endpoints[second]
        outstanding = self._outstanding
        return a if outstanding.get(a.address, 0) <= outstanding.get(b.address, 0) else b

    def acquire(self, address: str) -> None:
        self._outstanding[address] = self._outstanding.get(address, 0) + 1

    def release(self, address: str) -> None:
        left = self._outstanding.get(address, 0) - 1
        if left > 0:
            self._outstanding[address] = left
        else:
            self._outstanding.pop(address, None)

    def outstanding(self, address: str) -> int:
        return self._outstanding.get(address, 0)
