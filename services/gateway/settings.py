"""The gateway's settings (environment variables ``MAAS_GATEWAY_*`` plus the common ``MAAS_*``)."""

from __future__ import annotations

from pydantic import Field

from shared.settings import CommonSettings, MiB


class GatewaySettings(CommonSettings):
    """Settings of the gateway service."""

    gateway_address: str = Field(
        "127.0.0.1:8001", description="host:port the gateway's KServe v2 gRPC server binds (8001: what clients expect)."
    )
    gateway_metrics_address: str = Field(
        "127.0.0.1:9001", description="host:port of the gateway's Prometheus metrics endpoint (port 0 picks one)."
    )
    gateway_scheduler_address: str = Field(
        "127.0.0.1:7002", description="host:port of the scheduler the gateway learns endpoints from."
    )
    gateway_registry_address: str = Field(
        "127.0.0.1:7001", description="host:port of the registry (RepositoryIndex lists its models)."
    )
    gateway_max_hold_s: float = Field(
        60.0,
        gt=0,
        description="Longest a request without a deadline waits for a ready replica (scale from zero, restarts).",
    )
    gateway_max_held_requests: int = Field(
        10_000,
        ge=1,
        description="Requests that may wait at once for a ready replica or for the endpoint table; beyond it, "
        "RESOURCE_EXHAUSTED with a retry delay instead of growing without bound.",
    )
    gateway_max_outbox_bytes: int = Field(
        256 * MiB,
        ge=MiB,
        description="Request bytes that may wait in the gateway for one worker's stream (see "
        "gateway_stream_hold_after); beyond it, RESOURCE_EXHAUSTED, as the worker's full queue would answer.",
    )
    gateway_retries: int = Field(
        2, ge=0, description="Extra attempts of an inference on another replica after one answers UNAVAILABLE."
    )
    gateway_report_interval_s: float = Field(
        0.5, gt=0, description="Seconds between two reports of the gateway's ongoing requests to the scheduler."
    )
    gateway_load_timeout_s: float = Field(
        300.0, gt=0, description="Longest RepositoryModelLoad waits for the deployment to be READY."
    )
    gateway_watch_backoff_max_s: float = Field(
        1.0,
        gt=0,
        description="Longest pause between two attempts to reconnect to the scheduler's endpoint stream (short: "
        "until it reconnects, the gateway is not ready and holds requests for models it does not know yet).",
    )
    gateway_worker_streams: bool = Field(
        True,
        description="Send unary inference requests to each worker over one long-lived InferStream, multiplexed "
        "by id (about half the per-request cost of a unary call on both ends of the hop); False: one ModelInfer "
        "call per request.",
    )
    gateway_stream_hold_after: int = Field(
        2,
        ge=0,
        description="Requests in flight on a worker's stream beyond which further requests wait in the gateway and "
        "leave together when the next answers arrive (fewer, larger messages under load; a request alone never "
        "waits); 0: never wait.",
    )
    gateway_stream_max_in_flight: int = Field(
        64, ge=1, description="Requests of one ModelStreamInfer stream that run at once; the next are read as they end."
    )
    gateway_stream_buffer: int = Field(
        256, ge=1, description="Responses of one ModelStreamInfer stream waiting for a slow client before workers wait."
    )
    gateway_stream_idle_s: float = Field(
        300.0,
        gt=0,
        description="A ModelStreamInfer stream that sends nothing while nothing of it runs for this long is ended "
        "(DEADLINE_EXCEEDED); one waiting for a long generation is not idle.",
    )
    gateway_shared_memory: bool = Field(
        False,
        description="Serve Triton's system shared-memory extension (SystemSharedMemoryRegister/Status/Unregister; "
        "inputs and outputs in POSIX shared memory of the gateway's host, per tenant); off as in Triton.",
    )
    gateway_shared_memory_max_regions: int = Field(
        64, ge=1, description="Shared-memory regions one tenant may hold registered at once."
    )
    gateway_trace_workers: bool = Field(
        True, description="Propagate the trace context (traceparent) on the calls the gateway makes to workers."
    )
