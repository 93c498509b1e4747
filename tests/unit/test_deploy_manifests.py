"""deploy/ is consistent: Kubernetes manifests match the API schemas, compose and Prometheus agree.

Offline and fast: kubernetes-validate ships the Kubernetes JSON schemas; nothing here needs Docker, a
cluster or the network. The RayCluster is a KubeRay custom resource without a built-in schema, so its
structure is checked by hand.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from services.gateway.settings import GatewaySettings
from services.inference.settings import InferenceSettings
from services.paramserver.settings import ParamServerSettings
from services.registry.settings import RegistrySettings
from services.scheduler.settings import SchedulerSettings
from services.training.settings import TrainingSettings

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
MANIFESTS = sorted(path for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml")
# The oldest Kubernetes these manifests promise to work on (grpc probes are GA since 1.27), and the newest
# the installed kubernetes-validate knows.
K8S_VERSIONS = ["1.29", kubernetes_validate.latest_version()]
CUSTOM_KINDS = {"RayCluster"}
# The maas services: compose service / Kubernetes Deployment name -> (gRPC port, metrics port).
SERVICES = {"gateway": (8001, 9001), "registry": (7001, 9002), "scheduler": (7002, 9003)}
SETTINGS = [
    RegistrySettings,
    SchedulerSettings,
    GatewaySettings,
    ParamServerSettings,
    TrainingSettings,
    InferenceSettings,
]


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@functools.cache
def _all_resources() -> tuple[dict[str, Any], ...]:
    """Every resource of every manifest, parsed once (callers only read them)."""
    return tuple(doc for path in MANIFESTS for doc in _documents(path))


def _find(kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in _all_resources() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def _pod_specs() -> list[tuple[str, dict[str, Any], set[str]]]:
    """(owner, pod spec, volume claim template names) of every workload, the RayCluster's groups included."""
    specs = []
    for doc in _all_resources():
        name = f"{doc['kind']} {doc['metadata']['name']}"
        if doc["kind"] in {"Deployment", "StatefulSet"}:
            templates = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
            specs.append((name, doc["spec"]["template"]["spec"], templates))
        elif doc["kind"] == "RayCluster":
            specs.append((f"{name} head", doc["spec"]["headGroupSpec"]["template"]["spec"], set()))
            for group in doc["spec"]["workerGroupSpecs"]:
                specs.append((f"{name} {group['groupName']}", group["template"]["spec"], set()))
    return specs


def _module_exists(module: str) -> bool:
    """``python -m module`` would find it in the repository (a package with __main__, or a module)."""
    path = ROOT.joinpath(*module.split("."))
    return (path / "__main__.py").is_file() or path.with_suffix(".py").is_file()


def _python_m(command: list[str] | str | None) -> list[str]:
    """Modules a container command runs with ``python -m``."""
    if not command:
        return []
    words = command.split() if isinstance(command, str) else [str(word) for word in command]
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word == "-m" and words[i - 1].startswith("python")]


def _known_maas_variables() -> set[str]:
    names = {"MAAS_CONFIG_FILE"}
    for settings in SETTINGS:
        prefix = settings.model_config.get("env_prefix", "")
        names |= {f"{prefix}{field}".upper() for field in settings.model_fields}
    return names


# Kubernetes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_the_kubernetes_schema(path: Path) -> None:
    documents = _documents(path)
    assert documents, f"{path.name} holds no resource"
    for doc in documents:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata']['name']} (Kubernetes {version}): {error}")


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [path.name for path in MANIFESTS]
    assert kustomization["namespace"] == "maas"
    assert [image["name"] for image in kustomization["images"]] == ["maas"]


def test_raycluster_structure() -> None:
    (cluster,) = [d for d in _all_resources() if d["kind"] == "RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    head = spec["headGroupSpec"]
    assert set(head) >= {"rayStartParams", "template"}
    assert spec["workerGroupSpecs"], "a RayCluster without workers runs nothing"
    groups = [head["template"]["spec"], *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]
    for group in spec["workerGroupSpecs"]:
        assert set(group) >= {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"}
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    # Every Ray pod runs the maas image, so that the scheduler's Ray client matches the cluster's Python and
    # Ray versions and actors can import the maas packages.
    for pod in groups:
        images = {container["image"].split(":")[0] for container in pod["containers"]}
        assert images == {"maas"}
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"ray=={spec["rayVersion"]}"' in pyproject
    # Head and workers get the same environment and storage (the env is written out twice, no anchors).
    head_container = groups[0]["containers"][0]
    for pod in groups[1:]:
        worker = pod["containers"][0]
        assert worker["env"] == head_container["env"]
        assert worker["volumeMounts"] == head_container["volumeMounts"]
        assert pod["volumes"] == groups[0]["volumes"]


def test_scheduler_joins_the_kuberay_head_service() -> None:
    (cluster,) = [d for d in _all_resources() if d["kind"] == "RayCluster"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    client_port = next(p["containerPort"] for p in head["ports"] if p["name"] == "client")
    scheduler = _find("Deployment", "scheduler")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in scheduler["env"]}
    # KubeRay names a RayCluster's head Service <name>-head-svc.
    assert env["MAAS_RAY_ADDRESS"] == f"ray://{cluster['metadata']['name']}-head-svc:{client_port}"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_deployment(name: str) -> None:
    grpc_port, metrics_port = SERVICES[name]
    deployment = _find("Deployment", name)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert _python_m(container["command"]) == [f"services.{name}"]
    assert _module_exists(f"services.{name}")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": grpc_port, "metrics": metrics_port}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env[f"MAAS_{name.upper()}_ADDRESS"] == f"0.0.0.0:{grpc_port}"
    assert env[f"MAAS_{name.upper()}_METRICS_ADDRESS"] == f"0.0.0.0:{metrics_port}"
    # Native gRPC probes on the gRPC port (grpc.health.v1).
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port, probe
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    service = _find("Service", name)
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports
    assert service["metadata"]["annotations"]["prometheus.io/port"] == str(metrics_port)


def test_pods_reference_what_exists() -> None:
    resources = _all_resources()
    secrets = {d["metadata"]["name"] for d in resources if d["kind"] == "Secret"}
    claims = {d["metadata"]["name"] for d in resources if d["kind"] == "PersistentVolumeClaim"}
    known = _known_maas_variables()
    for owner, pod, claim_templates in _pod_specs():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, owner
        for container in pod["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes.keys() | claim_templates, f"{owner}: no volume {mount['name']}"
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                # Optional Secrets are the operator's to create (auth tokens, S3 credentials).
                if ref and not ref.get("optional"):
                    assert ref["name"] in secrets, f"{owner}: Secret {ref['name']} is not in the manifests"
                if env["name"].startswith("MAAS_"):
                    assert env["name"] in known, f"{owner}: {env['name']} is no maas setting"
            for module in _python_m(container.get("command")):
                assert _module_exists(module), f"{owner}: no module {module}"


# Docker Compose ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _host_ports(service: dict[str, Any]) -> list[tuple[str, int]]:
    published = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            if "published" in port:
                published.append((port.get("host_ip", "0.0.0.0"), int(port["published"])))
            continue
        parts = str(port).split("/")[0].rsplit(":", 2)
        if len(parts) == 3:
            published.append((parts[0], int(parts[1])))
        elif len(parts) == 2:
            published.append(("0.0.0.0", int(parts[0])))
    return published


def test_compose_depends_on_existing_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown service {dependency}"


def test_compose_host_ports_do_not_collide(compose: dict[str, Any]) -> None:
    owners: dict[int, str] = {}
    for name, service in compose["services"].items():
        for host_ip, port in _host_ports(service):
            assert host_ip == "127.0.0.1", f"{name} publishes {port} on {host_ip}, not loopback"
            assert port not in owners, f"host port {port}: {owners.get(port)} and {name}"
            owners[port] = name
    # The project's port plan (deploy/README.md).
    for name, (grpc_port, metrics_port) in SERVICES.items():
        assert owners[grpc_port] == name and owners[metrics_port] == name


def test_compose_commands_name_existing_modules(compose: dict[str, Any]) -> None:
    seen = set()
    for name, service in compose["services"].items():
        for module in _python_m(service.get("command")):
            assert _module_exists(module), f"{name} runs python -m {module}, which does not exist"
            seen.add(module)
    assert seen >= {f"services.{name}" for name in SERVICES}


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    known = _known_maas_variables()
    for name, (grpc_port, metrics_port) in SERVICES.items():
        env = services[name]["environment"]
        assert env[f"MAAS_{name.upper()}_ADDRESS"] == f"0.0.0.0:{grpc_port}"
        assert env[f"MAAS_{name.upper()}_METRICS_ADDRESS"] == f"0.0.0.0:{metrics_port}"
        assert f'"127.0.0.1:{grpc_port}"' in " ".join(services[name]["healthcheck"]["test"])
    for name, service in services.items():
        for variable in service.get("environment", {}):
            if variable.startswith("MAAS_"):
                assert variable in known, f"{name}: {variable} is no maas setting"
    # Every named volume is declared; the shared storage is mounted at the same path everywhere.
    declared = set(compose["volumes"])
    shared_paths = set()
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target = str(volume).split(":")[:2]
            if not source.startswith("."):
                assert source in declared, f"{name}: volume {source} is not declared"
            if source == "maas-shared":
                shared_paths.add(target)
    assert shared_paths == {"/var/lib/maas/shared"}
    # The scheduler joins the compose Ray head; the Ray nodes run the maas image like the services.
    scheduler_env = services["scheduler"]["environment"]
    assert scheduler_env["MAAS_RAY_ADDRESS"] == "ray://ray-head:10001"
    assert "--ray-client-server-port=10001" in services["ray-head"]["command"]
    for root in ("MAAS_SCHEDULER_CHECKPOINT_ROOT", "MAAS_SCHEDULER_DATA_ROOT"):
        assert scheduler_env[root].startswith("/var/lib/maas/shared/")
    for node in ("ray-head", "ray-worker"):
        assert services[node]["image"] == services["scheduler"]["image"]
        assert services[node]["environment"]["RAY_AUTH_TOKEN"] == scheduler_env["RAY_AUTH_TOKEN"]
        assert "maas-shared:/var/lib/maas/shared" in services[node]["volumes"]
    # The registry keeps artifacts in the compose S3 store.
    registry_env = services["registry"]["environment"]
    assert registry_env["MAAS_REGISTRY_ARTIFACT_URL"].startswith("s3://")
    assert registry_env["AWS_ACCESS_KEY_ID"] == services["minio"]["environment"]["MINIO_ROOT_USER"]
    assert registry_env["AWS_SECRET_ACCESS_KEY"] == services["minio"]["environment"]["MINIO_ROOT_PASSWORD"]


def test_dockerfile_default_command_exists() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    (cmd,) = re.findall(r"^CMD (\[.*\])$", dockerfile, flags=re.MULTILINE)
    for module in _python_m(yaml.safe_load(cmd)):
        assert _module_exists(module)


# Prometheus ----------------------------------------------------------------------------------------------


def test_prometheus_scrapes_every_service(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: [target for static in job["static_configs"] for target in static["targets"]]
        for job in config["scrape_configs"]
    }
    for name, (_, metrics_port) in SERVICES.items():
        assert targets[name] == [f"{name}:{metrics_port}"]
        assert name in compose["services"]
