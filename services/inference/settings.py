"""The inference worker's settings (environment variables ``MAAS_INFERENCE_*`` plus the common ``MAAS_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from shared.settings import CommonSettings

MiB = 1024**2
GiB = 1024**3


class InferenceSettings(CommonSettings):
    """Settings of one inference worker process (a Ray actor created by the scheduler, or standalone)."""

    inference_address: str = Field(
        "127.0.0.1:0",
        description="host:port the worker's gRPC server (KServe v2 data plane and control plane) binds; port 0 "
        "picks a free one (the scheduler reports the address).",
    )
    inference_metrics_address: str = Field(
        "127.0.0.1:0", description="host:port of the worker's Prometheus metrics endpoint (port 0 picks one)."
    )
    inference_registry_address: str = Field(
        "127.0.0.1:7001", description="host:port of the registry the worker downloads artifacts from."
    )
    inference_torch_threads: int = Field(
        1,
        ge=1,
        description="torch intra-op threads of the compute thread; 1 keeps a worker that shares cores with "
        "servers and clients fast (MEASUREMENTS.md).",
    )
    inference_device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="Device models run on: auto (cuda when a GPU is visible, else cpu), cpu, cuda or cuda:N.",
    )
    inference_memory_budget_bytes: int = Field(
        2 * GiB,
        ge=1,
        description="Weight bytes all loaded versions may hold together; least recently used idle versions are "
        "unloaded to make room.",
    )
    inference_cache_dir: Path | None = Field(
        None,
        description="Directory of downloaded artifacts, named by sha256; default: MAAS_HOME/inference/cache.",
    )
    inference_warmup: bool = Field(True, description="Run one execution of every version before it is reported ready.")
    inference_max_new_tokens: int = Field(
        512, ge=1, description="Most tokens one generation request (parameter max_tokens) may ask for."
    )
    inference_max_queue_bytes: int = Field(
        256 * MiB,
        ge=1,
        description="Bytes of decoded inputs the queue of one loaded version may hold; beyond it requests get "
        "RESOURCE_EXHAUSTED with a retry delay, like a full queue. A request is always accepted into an "
        "empty queue (MAAS_MAX_MESSAGE_BYTES bounds it).",
    )

    def cache_dir(self) -> Path:
        return self.inference_cache_dir or self.home / "inference" / "cache"
