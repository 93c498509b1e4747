"""``maas.Client``: the blocking SDK. Every call runs on an :class:`AsyncClient` in a private event loop thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
from inference import grpc_service_pb2 as kpb
from maas._async import AsyncClient
from maas._jobs import AsyncJob, JobProgress
from maas._models import ProgressCallback
from maas._settings import ClientSettings, Credentials
from maas.registry.v1 import registry_pb2 as rpb
from maas.scheduler.v1 import scheduler_pb2 as spb

from shared.grpc.calls import RetryPolicy

T = TypeVar("T")


class _Loop:
    """An event loop on a daemon thread; blocking callers hand it coroutines."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="maas-client", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def iterate(self, stream: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self.run(anext(stream))  # type: ignore[arg-type]
                except StopAsyncIteration:
                    return
        finally:
            # Closing the generator cancels its call (a watch or a generation left early).
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                self.run(aclose())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class Models:
    """Models and versions in the registry (see :class:`maas.AsyncClient` ``.models`` for the details)."""

    def __init__(self, client: AsyncClient, loop: _Loop) -> None:
        self._models = client.models
        self._loop = loop

    def create(self, name: str, *, description: str = "", tags: dict[str, str] | None = None) -> rpb.Model:
        """Create an empty model."""
        return self._loop.run(self._models.create(name, description=description, tags=tags))

    def list(self, *, prefix: str = "", tags: dict[str, str] | None = None) -> list[rpb.Model]:
        """Every model whose name starts with ``prefix`` and which has all of ``tags``."""
        return self._loop.run(self._models.list(prefix=prefix, tags=tags))

    def get(self, name: str) -> rpb.Model:
        """A model."""
        return self._loop.run(self._models.get(name))

    def get_version(self, ref: str | rpb.VersionRef) -> rpb.Version:
        """A version (``MODEL``, ``MODEL@VERSION`` or ``MODEL@ALIAS``)."""
        return self._loop.run(self._models.get_version(ref))

    def push(
        self,
        model: str,
        artifact: Path | str,
        *,
        manifest_json: str | None = None,
        tags: dict[str, str] | None = None,
        description: str = "",
        progress: ProgressCallback | None = None,
        sign_key: Path | None = None,
        key_password: str | None = None,
    ) -> rpb.Version:
        """Upload a safetensors file as a new version (``progress`` is called with each chunk's size)."""
        return self._loop.run(
            self._models.push(
                model,
                artifact,
                manifest_json=manifest_json,
                tags=tags,
                description=description,
                progress=progress,
                sign_key=sign_key,
                key_password=key_password,
            )
        )

    def pull(
        self, ref: str | rpb.VersionRef, dest: Path | str, *, progress: ProgressCallback | None = None
    ) -> rpb.Version:
        """Download a version into ``dest`` (resuming; the sha256 is verified)."""
        return self._loop.run(self._models.pull(ref, dest, progress=progress))

    def alias(self, model: str, alias: str, version: int, *, create_only: bool = False) -> rpb.Alias:
        """Point ``model@alias`` at ``version``."""
        return self._loop.run(self._models.alias(model, alias, version, create_only=create_only))

    def delete_alias(self, model: str, alias: str) -> None:
        """Remove an alias."""
        self._loop.run(self._models.delete_alias(model, alias))

    def derive(self, ref: str | rpb.VersionRef, variant: str) -> rpb.Version:
        """Derive a compressed variant (fp16, bf16, int8) as a new version."""
        return self._loop.run(self._models.derive(ref, variant))

    def delete(self, name: str, *, force: bool = False) -> None:
        """Delete a model with all its versions."""
        self._loop.run(self._models.delete(name, force=force))


class Job:
    """A handle to one training job."""

    def __init__(self, job: AsyncJob, loop: _Loop) -> None:
        self._job = job
        self._loop = loop

    @property
    def id(self) -> str:
        """The job's id."""
        return self._job.id

    @property
    def info(self) -> spb.Job:
        """The job as last seen."""
        return self._job.info

    @property
    def state(self) -> str:
        """The state by name, as last seen."""
        return self._job.state

    def refresh(self) -> spb.Job:
        """Fetch the job again."""
        return self._loop.run(self._job.refresh())

    def watch(self) -> Iterator[JobProgress]:
        """State changes and step metrics as they happen, until the job ends."""
        return self._loop.iterate(self._job.watch())

    def wait(self, timeout_s: float | None = None) -> spb.Job:
        """Wait until the job ends and return it (``TimeoutError`` after ``timeout_s``)."""
        return self._loop.run(self._job.wait(timeout_s))

    def cancel(self) -> spb.Job:
        """Cancel the job."""
        return self._loop.run(self._job.cancel())


class Jobs:
    """Training jobs in the scheduler."""

    def __init__(self, client: AsyncClient, loop: _Loop) -> None:
        self._jobs = client.jobs
        self._loop = loop

    def submit(self, spec: spb.TrainingJobSpec, *, request_id: str | None = None) -> Job:
        """Submit a training job (retried safely: the request carries a request id)."""
        return Job(self._loop.run(self._jobs.submit(spec, request_id=request_id)), self._loop)

    def get(self, job_id: str) -> Job:
        """A handle to an existing job."""
        return Job(self._loop.run(self._jobs.get(job_id)), self._loop)

    def list(self, *, states: list[str] | None = None, tenant: str = "") -> list[spb.Job]:
        """Every job, optionally only in ``states`` or of ``tenant``."""
        return self._loop.run(self._jobs.list(states=states, tenant=tenant))

    def cancel(self, job_id: str) -> spb.Job:
        """Cancel a job."""
        return self._loop.run(self._jobs.cancel(job_id))


class Deployments:
    """Inference deployments in the scheduler."""

    def __init__(self, client: AsyncClient, loop: _Loop) -> None:
        self._deployments = client.deployments
        self._loop = loop

    def create(self, spec: spb.DeploymentSpec | str, *, request_id: str | None = None) -> spb.Deployment:
        """Deploy a registry model (retried safely: the request carries a request id)."""
        return self._loop.run(self._deployments.create(spec, request_id=request_id))

    def update(self, spec: spb.DeploymentSpec | str) -> spb.Deployment:
        """Replace a deployment's spec (a rolling update)."""
        return self._loop.run(self._deployments.update(spec))

    def get(self, name: str) -> spb.Deployment:
        """A deployment with its replicas."""
        return self._loop.run(self._deployments.get(name))

    def list(self) -> list[spb.Deployment]:
        """Every deployment the caller sees."""
        return self._loop.run(self._deployments.list())

    def delete(self, name: str) -> None:
        """Remove a deployment."""
        self._loop.run(self._deployments.delete(name))

    def wait_ready(self, name: str, *, timeout_s: float = 600.0, poll_s: float = 0.5) -> spb.Deployment:
        """Wait until the deployment is READY (``FailedPrecondition`` if it fails, ``DeadlineExceeded`` on
        timeout)."""
        return self._loop.run(self._deployments.wait_ready(name, timeout_s=timeout_s, poll_s=poll_s))


class Client:
    """A blocking client of a maas mesh; it takes the same arguments as :class:`maas.AsyncClient`.

    Example::

        with maas.Client() as client:
            version = client.models.push("digits", "digits.safetensors")
            client.deployments.create("digits")
            client.deployments.wait_ready("digits")
            scores = client.infer("digits", images)["logits"]
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        credentials: str | Credentials | None = None,
        registry_address: str | None = None,
        scheduler_address: str | None = None,
        gateway_address: str | None = None,
        settings: ClientSettings | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._loop = _Loop()

        async def build() -> AsyncClient:
            # grpc.aio channels belong to the loop they are made on: make them on the client's own.
            return AsyncClient(
                address,
                credentials=credentials,
                registry_address=registry_address,
                scheduler_address=scheduler_address,
                gateway_address=gateway_address,
                settings=settings,
                retry=retry,
            )

        try:
            self._async = self._loop.run(build())
        except BaseException:
            self._loop.stop()
            raise
        self.settings = self._async.settings
        self.models = Models(self._async, self._loop)
        """Models and versions in the registry."""
        self.jobs = Jobs(self._async, self._loop)
        """Training jobs in the scheduler."""
        self.deployments = Deployments(self._async, self._loop)
        """Inference deployments in the scheduler."""

    def infer(self, model: str, inputs: Mapping[str, Any] | Any, *, version: str = "") -> dict[str, np.ndarray]:
        """Run one inference through the gateway: numpy arrays or torch tensors in, numpy arrays out."""
        return self._loop.run(self._async.infer(model, inputs, version=version))

    def generate(self, model: str, prompt: str, *, max_tokens: int = 64, version: str = "") -> Iterator[str]:
        """Stream a continuation of ``prompt`` as text pieces."""
        return self._loop.iterate(self._async.generate(model, prompt, max_tokens=max_tokens, version=version))

    def model_metadata(self, model: str, *, version: str = "") -> kpb.ModelMetadataResponse:
        """A deployed model's inputs and outputs."""
        return self._loop.run(self._async.model_metadata(model, version=version))

    def close(self) -> None:
        """Close the channels and stop the client's thread."""
        try:
            self._loop.run(self._async.close())
        finally:
            self._loop.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
