"""Stand-ins for a gateway tested without a scheduler."""

from __future__ import annotations

from typing import Any


class NoControl:
    """A ``DeploymentControl`` with no deployments, for gateways whose tests never change one."""

    async def get(self, name: str) -> None:
        return None

    async def list_deployments(self) -> list[Any]:
        return []

    async def apply(self, options: Any) -> Any:
        raise AssertionError("this test changes no deployment")

    async def delete(self, name: str) -> None:
        raise AssertionError("this test changes no deployment")

    async def registry_models(self) -> list[str]:
        return []


class NoScheduler(NoControl):
    """A ``DeploymentControl`` as a gateway sees an unreachable scheduler: changes answer UNAVAILABLE."""

    async def apply(self, options: Any) -> Any:
        from shared.errors import Unavailable

        raise Unavailable("no scheduler in this test")

    async def delete(self, name: str) -> None:
        from shared.errors import Unavailable

        raise Unavailable("no scheduler in this test")
