"""The training worker's settings (``MAAS_TRAINING_*`` plus the common ``MAAS_*``)."""

from __future__ import annotations

from pydantic import Field

from shared.settings import CommonSettings


class TrainingSettings(CommonSettings):
    """Settings of a training worker process (usually a Ray actor started by the scheduler)."""

    training_address: str = Field("127.0.0.1:0", description="host:port the worker's gRPC server binds (0: any).")
    training_metrics_address: str = Field("127.0.0.1:0", description="host:port of the worker's metrics endpoint.")
    training_torch_threads: int = Field(
        1, ge=1, description="torch threads per worker: workers share cores with shards and servers."
    )
