"""Observability end to end: traces and logs of real processes, at a real OTLP receiver.

The registry, the scheduler and the gateway run as processes (the scheduler on this session's Ray, joined by
address, so that its actors start with only what it passes them, as on a cluster), each exporting spans over
OTLP/gRPC to a receiver in this test (``TraceService/Export`` on a real gRPC server). A tiny digits job is
submitted inside a client span, its model deployed, and one ModelInfer sent inside another. Each trace must
arrive whole: spans of every service on its path (client -> scheduler -> training rank -> shard -> registry;
client -> gateway -> inference worker), every one's parent a span of the same trace, up to the client's. And
every JSON line the gateway and the worker wrote while answering the request carries its trace id.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inference import grpc_service_pb2 as kpb
from inference import grpc_service_pb2_grpc
from maas.scheduler.v1 import scheduler_pb2 as spb
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider

from shared.grpc.channel import make_channel
from shared.settings import CommonSettings
from tests.integration.test_scheduler_crash import REPO, SchedulerProcess, _free_port
from tests.support.serving import infer_request

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
JOB_PATH = {"maas-scheduler", "maas-training", "maas-paramserver", "maas-registry"}
REQUEST_PATH = {"maas-gateway", "maas-inference"}
MODEL = "otlp-digits"
INFER = "/inference.GRPCInferenceService/ModelInfer"


@dataclass(frozen=True)
class Received:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """What an OpenTelemetry collector's OTLP/gRPC trace receiver does, keeping the spans."""

    def __init__(self) -> None:
        self.spans: list[Received] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        Received(
                            attributes.get("service.name", ""),
                            span.name,
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                        )
                    )
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[Received]:
        return [s for s in self.spans if s.trace_id == trace_id]


class ClientSpans(SpanProcessor):
    """This process's spans (the client's, and its calls'), while the test runs: each trace's top."""

    def __init__(self) -> None:
        self.spans: list[Received] = []
        self.recording = True

    def on_end(self, span: ReadableSpan) -> None:
        if self.recording and span.context is not None:
            parent = format(span.parent.span_id, "016x") if span.parent is not None else ""
            context = span.context
            self.spans.append(
                Received("client", span.name, format(context.trace_id, "032x"), format(context.span_id, "016x"), parent)
            )


@pytest.fixture
def client_spans() -> Iterator[ClientSpans]:
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)  # tests/conftest.py installs a recording one
    processor = ClientSpans()
    provider.add_span_processor(processor)  # a provider cannot drop one: it stops recording instead
    yield processor
    processor.recording = False


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    server = grpc.aio.server()
    collector = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield collector, f"http://127.0.0.1:{port}"
    await server.stop(0)


class ServiceProcess:
    """``python -m services.<name>`` with its lines in ``<tmp>/<name>.log``; ready once its health says so."""

    def __init__(self, name: str, tmp: Path, env: dict[str, str]) -> None:
        self.name, self.log_path = name, tmp / f"{name}.log"
        self.address = f"127.0.0.1:{_free_port()}"
        self.env = {
            **env,
            f"MAAS_{name.upper()}_ADDRESS": self.address,
            f"MAAS_{name.upper()}_METRICS_ADDRESS": "127.0.0.1:0",
        }
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", f"services.{self.name}"], cwd=REPO, env=self.env, stdout=out, stderr=out
            )
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                assert self.process.poll() is None, f"{self.name} exited:\n{self.log_path.read_text()[-3000:]}"
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.2)
        raise AssertionError(f"{self.name} did not become ready")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def json_lines(paths: list[Path]) -> Iterator[dict[str, Any]]:
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    yield json.loads(line)
                except ValueError:
                    continue  # a line another writer interleaved with


def actor_logs(since: float) -> list[Path]:
    """The stderr files of this session's Ray workers written since ``since`` (the actors' log lines)."""
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    return [p for p in logs.glob("worker-*.err") if p.stat().st_mtime >= since]


async def whole_trace(
    receiver: Receiver, client: ClientSpans, root: trace.Span, services: set[str], timeout_s: float = 30
) -> list[Received]:
    """The root's trace once spans of every service in ``services`` arrived, and every span's parent (but the
    root's, the client's span) is a span of it: one tree."""
    context = root.get_span_context()
    trace_id, root_id = format(context.trace_id, "032x"), format(context.span_id, "016x")
    deadline = time.monotonic() + timeout_s
    while True:
        spans = receiver.trace(trace_id) + [s for s in client.spans if s.trace_id == trace_id]
        ids = {s.span_id for s in spans}
        orphans = [s for s in spans if s.span_id != root_id and s.parent_id not in ids]
        if services <= {s.service for s in spans} and not orphans and root_id in ids:
            return spans
        if time.monotonic() > deadline:
            seen = sorted({(s.service, s.name) for s in spans})
            raise AssertionError(f"trace {trace_id} incomplete: orphans {orphans}, spans seen {seen}")
        await asyncio.sleep(0.5)


def services_above(span: Received, spans: list[Received]) -> list[str]:
    """The services of ``span``'s ancestors in ``spans``, nearest first."""
    by_id = {s.span_id: s for s in spans}
    chain = []
    while (parent := by_id.get(span.parent_id)) is not None:
        chain.append(parent.service)
        span = parent
    return chain


async def test_a_jobs_and_a_requests_traces_arrive_whole(
    ray_local: None, receiver: tuple[Receiver, str], client_spans: ClientSpans, tmp_path: Path
) -> None:
    collector, endpoint = receiver
    started = time.time()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "gen")]),
        "MAAS_INSECURE": "1",
        "MAAS_HOME": str(tmp_path / "home"),
        "MAAS_LOG_FORMAT": "json",
        "MAAS_LOG_LEVEL": "debug",
        "MAAS_SHUTDOWN_GRACE_S": "1",
        "MAAS_OTEL_EXPORTER": "otlp",
        "MAAS_OTEL_ENDPOINT": endpoint,
        # Batches leave the processes quickly (the actors, which get no such variable, flush when stopped).
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    registry = ServiceProcess("registry", tmp_path, env)
    await registry.start()
    scheduler = SchedulerProcess(
        tmp_path,
        f"sqlite:///{tmp_path / 'scheduler.db'}",
        int(registry.address.rsplit(":", 1)[1]),
        otel_exporter="otlp",
        otel_endpoint=endpoint,
        log_level="debug",
    )
    gateway = ServiceProcess(
        "gateway",
        tmp_path,
        {
            **env,
            "MAAS_GATEWAY_SCHEDULER_ADDRESS": scheduler.address,
            "MAAS_GATEWAY_REGISTRY_ADDRESS": registry.address,
        },
    )
    tracer = trace.get_tracer("tests.client")
    try:
        await scheduler.start()
        await gateway.start()

        with tracer.start_as_current_span("client: train") as train_span:
            job = await scheduler.submit(target_model=MODEL, epochs=1)
        job = await scheduler.wait_job(job.id, lambda j: j.state == spb.SUCCEEDED, timeout_s=120)
        assert job.state == spb.SUCCEEDED, job

        spec = spb.DeploymentSpec(model=MODEL, version=str(job.model_version), min_replicas=1, resources={"cpus": 0.5})
        await scheduler.stub.CreateDeployment(spb.CreateDeploymentRequest(spec=spec), timeout=30)
        channel = make_channel(gateway.address, CommonSettings())
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        deadline = time.monotonic() + 120
        while not (await stub.ModelReady(kpb.ModelReadyRequest(name=MODEL), timeout=10)).ready:
            assert time.monotonic() < deadline, "the deployment never became ready at the gateway"
            await asyncio.sleep(0.3)
        x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
        with tracer.start_as_current_span("client: infer") as infer_span:
            request = infer_request(MODEL, x)
            request.id = infer_id = f"otlp-{uuid.uuid4().hex}"
            await stub.ModelInfer(request, timeout=30)
        await channel.close()

        job_spans = await whole_trace(collector, client_spans, train_span, JOB_PATH)
        upload = [s for s in job_spans if s.service == "maas-registry" and s.name.endswith("/UploadVersion")]
        assert upload, sorted({(s.service, s.name) for s in job_spans})
        # The rank uploads, as part of the job the scheduler runs for the client's submission.
        assert services_above(upload[0], job_spans)[:2] == ["maas-training", "maas-training"]
        assert "maas-scheduler" in services_above(upload[0], job_spans)
        pushes = [s for s in job_spans if s.service == "maas-paramserver" and s.name.endswith("/Push")]
        assert pushes and all("maas-training" in services_above(s, job_spans) for s in pushes)

        request_spans = await whole_trace(collector, client_spans, infer_span, REQUEST_PATH)
        worker = [s for s in request_spans if s.service == "maas-inference"]
        # The worker's spans hang under the gateway's (the entry's span under the gateway's call's).
        assert worker and all(
            next(x for x in services_above(s, request_spans) if x != "maas-inference") == "maas-gateway" for s in worker
        )

        trace_id = format(infer_span.get_span_context().trace_id, "032x")
        gateway_lines = [line for line in json_lines([gateway.log_path]) if line.get("rpc_method") == INFER]
        assert gateway_lines, "the gateway logged nothing for the request"
        assert [line for line in gateway_lines if line.get("trace_id") != trace_id] == []
        # The worker's lines of the request, told by the request's own id (not by a trace id).
        worker_lines = [line for line in json_lines(actor_logs(started)) if line.get("infer_id") == infer_id]
        assert worker_lines, "the worker logged nothing for the request"
        assert [line for line in worker_lines if line.get("trace_id") != trace_id] == []
    finally:
        try:
            await scheduler.stub.DeleteDeployment(spb.DeleteDeploymentRequest(name=MODEL), timeout=60)
        except (grpc.aio.AioRpcError, AttributeError):
            pass
        gateway.stop()
        await scheduler.stop()
        registry.stop()
