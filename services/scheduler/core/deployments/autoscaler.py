"""The autoscaling policy: pure, clock injected, no I/O.

Gateways report their ongoing requests (in flight or held) per deployment; a gateway silent for
``report_ttl_s`` no longer counts. Per deployment the wanted replicas are ``ceil(ongoing / target)``
clamped to [min, max]; the target moves up only after demand stayed above it for the upscale delay, down
after it stayed below for the downscale delay, except from zero: any ongoing request at zero replicas
scales to one at once (a request is waiting).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.scheduler.core.deployments.model import Autoscaling

DEFAULT_REPORT_TTL_S = 10.0


@dataclass
class _Trend:
    target: int
    above_since: float | None = None
    below_since: float | None = None


def split_replicas(total: int, canary_weight_percent: int) -> tuple[int, int]:
    """(default, canary) replicas for ``total``: by weight, at least one each from a total of 2; a total of
    1 goes to the default version."""
    if total <= 0:
        return 0, 0
    if canary_weight_percent <= 0 or total == 1:
        return total, 0
    canary = min(max(round(total * canary_weight_percent / 100), 1), total - 1)
    return total - canary, canary


class Autoscaler:
    """Gateways' load reports and each deployment's replica target."""

    def __init__(self, report_ttl_s: float = DEFAULT_REPORT_TTL_S) -> None:
        self._ttl = report_ttl_s
        # Gateway id -> (when reported, deployment -> ongoing).
        self._reports: dict[str, tuple[float, dict[str, float]]] = {}
        self._trends: dict[str, _Trend] = {}

    def report(self, gateway_id: str, ongoing: dict[str, float], now: float) -> None:
        """A gateway's latest load (replaces its previous report)."""
        self._reports[gateway_id] = (now, dict(ongoing))

    def ongoing(self, name: str, now: float) -> float:
        """Requests ongoing for ``name`` summed over the gateways heard from within the TTL."""
        for gateway in [g for g, (at, _) in self._reports.items() if now - at > self._ttl]:
            del self._reports[gateway]
        return sum(load.get(name, 0.0) for _, load in self._reports.values())

    def forget(self, name: str) -> None:
        self._trends.pop(name, None)

    def target(self, name: str, policy: Autoscaling, min_replicas: int, max_replicas: int, now: float) -> int:
        """The replicas ``name`` should run now (its previous target moved as the policy allows)."""
        if not policy.enabled:
            self._trends.pop(name, None)
            return max(min_replicas, 1)
        trend = self._trends.get(name)
        if trend is None:
            trend = self._trends[name] = _Trend(target=min_replicas)
        # Bounds changed by an update apply at once.
        trend.target = min(max(trend.target, min_replicas), max_replicas)
        ongoing = self.ongoing(name, now)
        wanted = min(max(math.ceil(ongoing / policy.target_ongoing_requests - 1e-9), min_replicas), max_replicas)
        if trend.target == 0 and ongoing > 0:
            trend.target = max(1, min_replicas)
            trend.above_since = trend.below_since = None
            return trend.target
        if wanted > trend.target:
            trend.below_since = None
            if trend.above_since is None:
                trend.above_since = now
            if now - trend.above_since >= policy.upscale_delay:
                trend.target, trend.above_since = wanted, None
        elif wanted < trend.target:
            trend.above_since = None
            if trend.below_since is None:
                trend.below_since = now
            if now - trend.below_since >= policy.downscale_delay:
                trend.target, trend.below_since = wanted, None
        else:
            trend.above_since = trend.below_since = None
        return trend.target
