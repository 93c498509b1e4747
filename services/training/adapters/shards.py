"""The training loop's view of parameter-server shards, over their gRPC client."""

from __future__ import annotations

from collections.abc import Mapping

from shared.clients.paramserver import ParamServerClient, PullResult, PushResult
from shared.compression import Encoded


class GrpcShard:
    """Implements ``core.ports.ShardClient`` with :class:`ParamServerClient`."""

    def __init__(self, client: ParamServerClient) -> None:
        self.client = client

    async def pull(
        self, job_id: str, worker: int, step: int, versions: Mapping[str, int], incarnation: str, wait_timeout_s: float
    ) -> PullResult:
        return await self.client.pull(job_id, worker, step, versions, incarnation, wait_timeout_s)

    async def push(self, job_id: str, worker: int, step: int, encoded: Mapping[str, Encoded]) -> PushResult:
        return await self.client.push(job_id, worker, step, encoded)

    async def replace_worker(self, job_id: str, worker: int) -> int:
        return await self.client.replace_worker(job_id, worker)

    async def worker_clocks(self, job_id: str) -> dict[int, int]:
        status = await self.client.status(job_id)
        return dict(status.worker_clocks)
