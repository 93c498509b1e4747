"""What the training loop needs from the outside."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

from shared.compression import Encoded


class Pulled(Protocol):
    @property
    def incarnation(self) -> str: ...
    @property
    def tensors(self) -> dict[str, tuple[int, torch.Tensor]]: ...
    @property
    def bytes_received(self) -> int: ...


class Pushed(Protocol):
    @property
    def bytes_sent(self) -> int: ...
    @property
    def duplicate(self) -> bool: ...


class ShardClient(Protocol):
    """One parameter-server shard, as a worker sees it."""

    async def pull(
        self, job_id: str, worker: int, step: int, versions: Mapping[str, int], incarnation: str, wait_timeout_s: float
    ) -> Pulled: ...

    async def push(self, job_id: str, worker: int, step: int, encoded: Mapping[str, Encoded]) -> Pushed: ...

    async def replace_worker(self, job_id: str, worker: int) -> int: ...

    async def worker_clocks(self, job_id: str) -> dict[int, int]: ...
