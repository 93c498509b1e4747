"""Prometheus metrics: one registry per service, served over HTTP."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class RpcMetrics:
    """RPC counts by method and status code, and latency by method."""

    registry: CollectorRegistry
    requests: Counter
    latency: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> RpcMetrics:
        registry = registry or CollectorRegistry()
        requests = Counter(
            "maas_rpc_requests", "RPCs handled, by method and status code.", ["method", "code"], registry=registry
        )
        latency = Histogram(
            "maas_rpc_duration_seconds",
            "RPC handling time, by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        return cls(registry=registry, requests=requests, latency=latency)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> tuple[object, int]:
    """Serve ``registry`` over HTTP on a daemon thread; returns (server, bound port). Port 0 picks one."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, server.server_port
