"""The mesh on a real two-node Ray cluster: trains across both nodes, serves from both, survives losing one.

A Ray head and a second node (``ray start`` twice, each with declared CPUs, the second with a custom
resource ``node2``), Ray's token authentication on and every listener on loopback
(tests/support/ray_cluster.py); ``maas up`` runs the registry, scheduler and gateway against it with
``MAAS_RAY_ADDRESS``, PostgreSQL as both services' database and moto's S3 server as the artifact store,
with the default security (TLS, API keys, mutual TLS inside). The digits MLP is trained by a gang of 2
shards and 2 workers of 1 CPU each on 2 + 2 CPUs, so it must span both nodes; it is deployed with 2
replicas, which the scheduler spreads over the nodes, so one runs on the second node (by spreading, not
by a pin: a deployment's resources cannot name a custom resource, and a replica pinned to the second node
by one could not be replaced on the head anyway). Under load through
the gateway the second node's raylet is SIGKILLed: the gateway retries on the head's replica (no request
fails), and the scheduler replaces the lost replica on the head. Then the deployment is deleted, the mesh
and the cluster stopped, and nothing of either may be left: no actor, no process.

Where each thing ran is asked of Ray itself, by a driver in a subprocess (this process may hold the test
session's own Ray, and Ray allows one driver per process).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import grpc
import numpy as np
import pytest
from inference import grpc_service_pb2 as kpb
from inference import grpc_service_pb2_grpc
from maas.scheduler.v1 import scheduler_pb2 as pb
from maas.scheduler.v1 import scheduler_pb2_grpc
from moto.server import ThreadedMotoServer
from sklearn.datasets import load_digits

from services.cli.mesh_state import MARKER as MESH_MARKER
from shared.processes import processes_with_env
from tests.support.postgres import postgres_server
from tests.support.ray_cluster import RayCluster, RayNode, free_port

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
BUCKET = "maas-multinode"
SERVING_LINE = "Ctrl-C stops the mesh."
MLP = json.dumps({"in_features": 64, "hidden": [64], "out_features": 10})

# Every node (by name, alive or not) and every actor of the cluster with the name of its node.
PLACEMENT = """
names = {names!r}
nodes = {{n["NodeID"]: names.get(n["NodeManagerPort"], "?") for n in ray.nodes()}}
actors = [
    {{"name": a["Name"], "state": a["State"], "node": nodes.get(a["Address"]["NodeID"], "?")}}
    for a in ray._private.state.actors().values()
]
print(json.dumps({{"nodes": sorted([nodes[n["NodeID"]], n["Alive"]] for n in ray.nodes()), "actors": actors}}))
"""


def _placement(cluster: RayCluster) -> dict[str, Any]:
    names = {node.node_manager_port: node.name for node in cluster.nodes}
    return dict(cluster.driver(PLACEMENT.format(names=names)))


@contextmanager
def s3_store() -> Iterator[dict[str, str]]:
    """moto's S3 server on loopback with one bucket; the environment the registry needs for it."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MAAS_REGISTRY_ARTIFACT_URL": f"s3://{BUCKET}/mesh",
        "MAAS_REGISTRY_S3_ENDPOINT_URL": f"http://{host}:{port}",
    }
    client = boto3.client(
        "s3",
        endpoint_url=env["MAAS_REGISTRY_S3_ENDPOINT_URL"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=BUCKET)
    try:
        yield env
    finally:
        server.stop()


class Mesh:
    """``maas up`` (no quickstart) as a subprocess; the test calls its services as a user would."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.log = home.parent / "up.log"
        self.gateway = env["MAAS_GATEWAY_ADDRESS"]
        self.scheduler = env["MAAS_SCHEDULER_ADDRESS"]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.cli.main", "up"],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_serving(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while SERVING_LINE not in self.output():
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"maas up did not serve (exit {self.process.poll()}):\n{self.output()[-6000:]}")
            time.sleep(0.5)
        credentials = json.loads((self.home / "credentials.json").read_text())
        self.tls = grpc.ssl_channel_credentials(Path(credentials["ca_file"]).read_bytes())
        self.auth = (("authorization", f"Bearer {credentials['api_key']}"),)

    def channel(self, address: str) -> grpc.Channel:
        return grpc.secure_channel(address, self.tls)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.wait(timeout=30)


def _wait(what: str, check: Any, timeout_s: float, interval_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout_s:g} s")
        time.sleep(interval_s)


def _infer_request(metadata: kpb.ModelMetadataResponse, count: int) -> tuple[kpb.ModelInferRequest, list[int]]:
    digits = load_digits()
    images = np.asarray(digits.images[-count:], dtype=np.float32) / 16.0
    shape = [count, *metadata.inputs[0].shape[1:]]
    request = kpb.ModelInferRequest(model_name="digits")
    request.inputs.add(name=metadata.inputs[0].name, datatype="FP32", shape=shape)
    request.raw_input_contents.append(images.reshape(shape).tobytes())
    return request, digits.target[-count:].tolist()


class Load:
    """Clients sending ModelInfer through the gateway in a loop until stopped; every outcome counted."""

    def __init__(self, mesh: Mesh, request: kpb.ModelInferRequest, clients: int) -> None:
        self.mesh, self.request = mesh, request
        self.stopped = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        with self.mesh.channel(self.mesh.gateway) as channel:
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            while not self.stopped.is_set():
                try:
                    stub.ModelInfer(self.request, metadata=self.mesh.auth, timeout=60)
                    with self._lock:
                        self.ok += 1
                except grpc.RpcError as exc:
                    with self._lock:
                        self.failures.append(f"{exc.code()}: {exc.details()}")

    def stop(self) -> None:
        self.stopped.set()
        for thread in self._threads:
            thread.join(timeout=90)


def test_mesh_trains_serves_and_loses_a_node_on_a_two_node_ray_cluster(tmp_path: Path) -> None:
    cluster = RayCluster()
    mesh: Mesh | None = None
    with postgres_server() as postgres, s3_store() as s3_env:
        try:
            cluster.start_head(num_cpus=2)
            node2 = cluster.add_node("node2", num_cpus=2, resources={"node2": 1})
            nodes = _placement(cluster)["nodes"]
            assert nodes == [["head", True], ["node2", True]], nodes
            exposed = [line for line in cluster.listeners() if not line.split()[3].startswith(("127.", "[::ffff:127."))]
            assert not exposed, "Ray listens beyond loopback:\n" + "\n".join(exposed)
            unauthenticated = subprocess.run(
                [sys.executable, "-c", f"import ray; ray.init(address={cluster.address!r})"],
                env={k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")},
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert unauthenticated.returncode != 0, "a driver without the cluster's token was let in"

            home = tmp_path / "home"
            env = {
                **cluster.env,
                "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "gen")]),
                "MAAS_HOME": str(home),
                "MAAS_RAY_ADDRESS": cluster.address,
                "MAAS_REGISTRY_DATABASE_URL": postgres.create_database("registry"),
                "MAAS_SCHEDULER_DATABASE_URL": postgres.create_database("scheduler"),
                **s3_env,
                "MAAS_REGISTRY_ADDRESS": f"127.0.0.1:{free_port()}",
                "MAAS_SCHEDULER_ADDRESS": f"127.0.0.1:{free_port()}",
                "MAAS_GATEWAY_ADDRESS": f"127.0.0.1:{free_port()}",
                "MAAS_REGISTRY_INTERNAL_ADDRESS": f"127.0.0.1:{free_port()}",
                "MAAS_SCHEDULER_INTERNAL_ADDRESS": f"127.0.0.1:{free_port()}",
                "MAAS_REGISTRY_METRICS_ADDRESS": "127.0.0.1:0",
                "MAAS_SCHEDULER_METRICS_ADDRESS": "127.0.0.1:0",
                "MAAS_GATEWAY_METRICS_ADDRESS": "127.0.0.1:0",
                "MAAS_SCHEDULER_REPLICA_HEALTH_INTERVAL_S": "0.5",
                "MAAS_SCHEDULER_REPLICA_PING_TIMEOUT_S": "2",
                "MAAS_SCHEDULER_REPLICA_DRAIN_DELAY_S": "0.5",
                "MAAS_SCHEDULER_REPLICA_STOP_GRACE_S": "2",
                "MAAS_SHUTDOWN_GRACE_S": "3",
                "MAAS_LOG_FORMAT": "json",
            }
            env.pop("MAAS_INSECURE", None)  # the secure default
            mesh = Mesh(home, env)
            mesh.wait_serving(180)
            with mesh.channel(mesh.scheduler) as channel:
                scheduler = scheduler_pb2_grpc.SchedulerServiceStub(channel)
                _train_across_both_nodes(cluster, mesh, scheduler)
                _serve_from_both_nodes_and_lose_one(cluster, mesh, scheduler, node2)
                scheduler.DeleteDeployment(pb.DeleteDeploymentRequest(name="digits"), metadata=mesh.auth, timeout=30)
                _wait("the deployment's replicas ended", lambda: not _alive_actors(cluster), 60)
            assert mesh.stop() == 0, mesh.output()[-6000:]
            assert not processes_with_env(MESH_MARKER, str(home.resolve()))
            assert _alive_actors(cluster) == [], "actors outlived the mesh"
            left = cluster.stop()
            assert not cluster.processes() and not cluster.group_members(), "Ray processes outlived the cluster's stop"
            # The raylets and the GCS end their workers and agents on SIGTERM; whatever needed a SIGKILL is
            # reported, not accepted.
            assert not left, f"Ray processes ignored SIGTERM: {left}"
        finally:
            failed = sys.exc_info()[0] is not None
            if mesh is not None and mesh.process.poll() is None:
                mesh.stop()
            cluster.stop(grace_s=3)
            if failed:
                print(f"the Ray cluster's logs are kept under {cluster.root}")
            else:
                cluster.remove()


def _alive_actors(cluster: RayCluster) -> list[dict[str, str]]:
    return [a for a in _placement(cluster)["actors"] if a["state"] != "DEAD"]


def _train_across_both_nodes(cluster: RayCluster, mesh: Mesh, scheduler: Any) -> None:
    spec = pb.TrainingJobSpec(
        architecture="mlp",
        arguments_json=MLP,
        dataset=pb.DatasetSpec(name="digits"),
        optimizer={"name": "sgd", "hyperparameters": {"lr": 0.1, "momentum": 0.9}},
        batch_size=32,
        epochs=8,
        workers=2,
        shards=2,
        consistency="bsp",
        checkpoint_interval=50,
        target_model="digits",
        seed=3,
        worker_resources={"cpus": 1},
        shard_resources={"cpus": 1},
    )
    job = scheduler.SubmitTrainingJob(pb.SubmitTrainingJobRequest(spec=spec), metadata=mesh.auth, timeout=30).job

    def finished() -> pb.Job | None:
        current = scheduler.GetJob(pb.GetJobRequest(id=job.id), metadata=mesh.auth, timeout=30).job
        return current if current.state in (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED) else None

    done = _wait("the training job did not finish", finished, 240, interval_s=1.0)
    assert done.state == pb.SUCCEEDED, done.message
    assert done.metrics["accuracy"] > 0.8, dict(done.metrics)
    # 4 CPUs of 1 for 2 shards and 2 workers: the gang filled both nodes (Ray keeps dead actors' nodes).
    gang = [a for a in _placement(cluster)["actors"] if a["name"].startswith(job.id)]
    assert len(gang) == 4 and {a["node"] for a in gang} == {"head", "node2"}, gang


def _ready_replicas(mesh: Mesh, scheduler: Any, count: int) -> list[pb.Replica]:
    """The deployment's ready replicas if there are ``count`` of them, else none."""
    reply = scheduler.GetDeployment(pb.GetDeploymentRequest(name="digits"), metadata=mesh.auth, timeout=30)
    ready = [r for r in reply.deployment.replicas if r.state == pb.REPLICA_READY]
    return ready if len(ready) == count else []


def _replica_nodes(cluster: RayCluster, replicas: list[pb.Replica]) -> list[str]:
    ids = {r.id for r in replicas}
    actors = _placement(cluster)["actors"]
    return sorted(a["node"] for a in actors if a["name"] in ids and a["state"] == "ALIVE")


def _serve_from_both_nodes_and_lose_one(cluster: RayCluster, mesh: Mesh, scheduler: Any, node2: RayNode) -> None:
    spec = pb.DeploymentSpec(model="digits", min_replicas=2, max_replicas=2)
    scheduler.CreateDeployment(pb.CreateDeploymentRequest(spec=spec), metadata=mesh.auth, timeout=30)
    replicas = _wait("2 replicas were not ready", lambda: _ready_replicas(mesh, scheduler, 2), 180)
    assert _replica_nodes(cluster, replicas) == ["head", "node2"], replicas

    with mesh.channel(mesh.gateway) as channel:
        gateway = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        ready = lambda: gateway.ModelReady(kpb.ModelReadyRequest(name="digits"), metadata=mesh.auth, timeout=10).ready  # noqa: E731
        _wait("the gateway did not report digits ready", ready, 60)
        metadata = gateway.ModelMetadata(kpb.ModelMetadataRequest(name="digits"), metadata=mesh.auth, timeout=30)
        request, labels = _infer_request(metadata, 16)
        reply = gateway.ModelInfer(request, metadata=mesh.auth, timeout=30)
        scores = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(tuple(reply.outputs[0].shape))
        right = sum(p == t for p, t in zip(scores.argmax(axis=1).tolist(), labels, strict=True))
        assert right >= 12, (scores.argmax(axis=1).tolist(), labels)

    load = Load(mesh, request, clients=2)
    try:
        _wait("no request got through before the node was lost", lambda: load.ok >= 20, 30, interval_s=0.1)
        before = {r.id for r in replicas}
        cluster.kill_raylet(node2)
        lost_at = time.monotonic()

        def replaced() -> list[pb.Replica] | None:
            now = _ready_replicas(mesh, scheduler, 2)
            return now if now and {r.id for r in now} != before else None

        after = _wait("the lost replica was not replaced", replaced, 120)
        replaced_s = time.monotonic() - lost_at
        served_during = load.ok
        time.sleep(2)  # and serving goes on from the replacement's endpoints
    finally:
        load.stop()
    print(f"node lost under load: {load.ok} answered, {len(load.failures)} failed, replaced in {replaced_s:.1f}s")
    assert load.failures == [], f"{len(load.failures)} failed requests ({load.ok} ok): {load.failures[:5]}"
    assert load.ok > served_during, "no request was served after the replacement"
    nodes = _placement(cluster)["nodes"]
    assert nodes == [["head", True], ["node2", False]], nodes
    assert _replica_nodes(cluster, after) == ["head", "head"], (after, replaced_s)
