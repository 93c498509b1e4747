"""The maas Python SDK: ``maas.Client`` (blocking) and ``maas.AsyncClient`` (asyncio).

``maas`` is also the namespace of the code generated from ``protos/`` (``maas.registry.v1`` and so on):
those packages live in ``gen/maas`` in a source checkout and beside this file in an installed wheel, so the
package's path is extended to find them wherever they are.

The SDK's names load on first use (PEP 562), so a server importing ``maas.registry.v1`` loads none of it.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

__path__ = pkgutil.extend_path(__path__, __name__)
# An editable install maps this package to the checkout's maas/ only; the generated packages beside it are
# in gen/maas (PYTHONPATH=.:gen finds them through extend_path above).
_GENERATED = Path(__file__).resolve().parent.parent / "gen" / "maas"
if _GENERATED.is_dir() and str(_GENERATED) not in __path__:
    __path__.append(str(_GENERATED))

if TYPE_CHECKING:
    from maas._async import AsyncClient
    from maas._deployments import AsyncDeployments
    from maas._jobs import AsyncJob, AsyncJobs, JobProgress
    from maas._models import AsyncModels
    from maas._settings import ClientSettings, Credentials
    from maas._sync import Client, Deployments, Job, Jobs, Models
    from maas._tenants import AsyncTenants
    from maas.errors import (
        AlreadyExists,
        Cancelled,
        DataLoss,
        DeadlineExceeded,
        FailedPrecondition,
        FieldViolation,
        Internal,
        InvalidArgument,
        MaasError,
        NotFound,
        PermissionDenied,
        ResourceExhausted,
        Unauthenticated,
        Unavailable,
    )

    from shared.grpc.calls import RetryPolicy

__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "AsyncDeployments",
    "AsyncJob",
    "AsyncJobs",
    "AsyncModels",
    "AsyncTenants",
    "Cancelled",
    "Client",
    "ClientSettings",
    "Credentials",
    "DataLoss",
    "DeadlineExceeded",
    "Deployments",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "Job",
    "JobProgress",
    "Jobs",
    "MaasError",
    "Models",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryPolicy",
    "Unauthenticated",
    "Unavailable",
]
_MODULES = {
    "AsyncClient": "maas._async",
    "AsyncDeployments": "maas._deployments",
    "AsyncJob": "maas._jobs",
    "AsyncJobs": "maas._jobs",
    "JobProgress": "maas._jobs",
    "AsyncModels": "maas._models",
    "AsyncTenants": "maas._tenants",
    "ClientSettings": "maas._settings",
    "Credentials": "maas._settings",
    "Client": "maas._sync",
    "Deployments": "maas._sync",
    "Job": "maas._sync",
    "Jobs": "maas._sync",
    "Models": "maas._sync",
    "RetryPolicy": "shared.grpc.calls",
}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'maas' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULES.get(name, "maas.errors")), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
