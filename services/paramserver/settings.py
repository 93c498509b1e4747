"""The parameter server's settings (environment variables ``MAAS_PARAMSERVER_*`` plus the common ``MAAS_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from shared.settings import CommonSettings


class ParamServerSettings(CommonSettings):
    """Settings of one parameter-server shard process."""

    paramserver_address: str = Field(
        "127.0.0.1:0",
        description="host:port the shard's gRPC server binds; port 0 picks a free one (shards are found by "
        "the scheduler, not by a fixed port).",
    )
    paramserver_metrics_address: str = Field(
        "127.0.0.1:0", description="host:port of the shard's Prometheus metrics endpoint (port 0 picks one)."
    )
    paramserver_pull_timeout_s: float = Field(
        300.0,
        gt=0,
        description="How long a pull waits for slower workers when the request sets no wait (seconds).",
    )
    paramserver_checkpoint_root: Path | None = Field(
        None,
        description="Directory that relative checkpoint_dir values of shard configs resolve inside; default: "
        "MAAS_HOME/checkpoints.",
    )

    def checkpoint_root(self) -> Path:
        return self.paramserver_checkpoint_root or self.home / "checkpoints"
