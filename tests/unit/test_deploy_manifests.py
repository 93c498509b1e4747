"""deploy/ is consistent: Kubernetes manifests match the API schemas, compose and Prometheus agree.

Offline and fast: kubernetes-validate ships the Kubernetes JSON schemas; nothing here needs Docker, a
cluster or the network. The RayCluster is a KubeRay custom resource without a built-in schema, so its
structure is checked by hand.

Security contract: the manifests carry no credential (every Secret is created out of band, is required,
and the command that creates it is written down), the services run with TLS and authentication and are
probed on a plaintext health-only port; compose runs maas in development mode, explicitly, and takes every
password and token from a required variable.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
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
from shared.security.pki import MESH_NAME
from shared.settings import CommonSettings

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
# Their plaintext grpc.health.v1-only ports on Kubernetes (MAAS_HEALTH_ADDRESS), which the probes call.
HEALTH_PORTS = {"gateway": 9011, "registry": 9012, "scheduler": 9013}
# Secrets a pod may reference as optional: their absence must open nothing. registry-s3 only chooses the
# S3 artifact store over the local volume.
OPTIONAL_SECRETS = {"registry-s3"}
# Variables whose value is a credential: never a literal in a manifest or in compose.
CREDENTIAL_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|DATABASE_URL")
# A URL with a password, scheme://user:password@host; the password may be a ${...} expression.
URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:((?:\$\{[^}]*\}|[^@\s])+)@")
# Compose's required-variable interpolation, ${VAR:?message}: compose refuses to start while VAR is unset or
# empty. The message may not hold "$" (it is interpolated too) nor "}".
REQUIRED_VARIABLE = re.compile(r"\$\{([A-Z][A-Z0-9_]*):\?[^}$]+\}")
# Credentials the deployment files once published: none may come back.
DEVELOPMENT_CREDENTIALS = ["maas-dev-ray-token", "maas-dev-secret", "maas:maas@"]
SETTINGS: list[type[CommonSettings]] = [
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


def _pod_specs(
    resources: Iterable[dict[str, Any]] | None = None,
) -> list[tuple[str, dict[str, Any], set[str]]]:
    """(owner, pod spec, volume claim template names) of every workload, the RayCluster's groups included
    (of ``resources``, default: every manifest's)."""
    specs = []
    for doc in _all_resources() if resources is None else resources:
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


def _strings(node: Any) -> Iterator[str]:
    """Every string value in a parsed YAML tree."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _comments(path: Path) -> str:
    """The text of a file's comment lines, without their ``#``."""
    lines = path.read_text().splitlines()
    return "\n".join(line.strip().lstrip("#").strip() for line in lines if line.lstrip().startswith("#"))


def _secret_refs(pod: dict[str, Any]) -> list[tuple[str, bool]]:
    """(Secret name, optional) of every Secret a pod spec uses: env, envFrom and volumes."""
    refs = []
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.append((ref["name"], bool(ref.get("optional"))))
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                refs.append((source["secretRef"]["name"], bool(source["secretRef"].get("optional"))))
    for volume in pod.get("volumes", []):
        if "secret" in volume:
            refs.append((volume["secret"]["secretName"], bool(volume["secret"].get("optional"))))
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                refs.append((source["secret"]["name"], bool(source["secret"].get("optional"))))
    return refs


def _secret_file(pod: dict[str, Any], container: dict[str, Any], path: str) -> tuple[str, str]:
    """(Secret, key) the file ``path`` of ``container`` comes from, through a read-only Secret volume."""
    directory, _, filename = path.rpartition("/")
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"].rstrip("/") == directory]
    assert len(mounts) == 1, f"{path}: expected one volume mounted at {directory}, found {len(mounts)}"
    (mount,) = mounts
    assert mount.get("readOnly") is True, f"{directory} is mounted writable"
    # A subPath mount never sees the Secret's updates (key revocation), and it hides the directory's others.
    assert "subPath" not in mount and "subPathExpr" not in mount, f"{directory} is a subPath mount"
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    secret = volume.get("secret")
    assert secret, f"{directory} is not a Secret volume"
    items = {item["path"]: item["key"] for item in secret.get("items", [])}
    return secret["secretName"], items[filename] if items else filename


def _is_true(value: Any) -> bool:
    """How pydantic reads a boolean setting from the environment (true, 1, yes, on)."""
    return str(value).strip().lower() in {"1", "true", "t", "yes", "y", "on"}


def _required_variable(value: str) -> str:
    """The variable of ``value``, which must be one compose required-variable expression, ${VAR:?message}."""
    match = REQUIRED_VARIABLE.fullmatch(value)
    assert match, f"{value!r} is a literal, not a required variable ${{VAR:?message}}"
    return match.group(1)


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
    health_port = HEALTH_PORTS[name]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": grpc_port, "metrics": metrics_port, "health": health_port}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env[f"MAAS_{name.upper()}_ADDRESS"] == f"0.0.0.0:{grpc_port}"
    assert env[f"MAAS_{name.upper()}_METRICS_ADDRESS"] == f"0.0.0.0:{metrics_port}"
    assert env["MAAS_HEALTH_ADDRESS"] == f"0.0.0.0:{health_port}"
    # Native gRPC probes (grpc.health.v1) on the plaintext health-only port: they cannot speak TLS, and the
    # gRPC port speaks nothing else.
    probed = int(env["MAAS_HEALTH_ADDRESS"].rpartition(":")[2])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == probed == health_port, probe
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    service = _find("Service", name)
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    # The health port stays out of the Service: only the kubelet dials it.
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"grpc": grpc_port, "metrics": metrics_port}
    assert service["metadata"]["annotations"]["prometheus.io/port"] == str(metrics_port)


def test_pods_reference_what_exists() -> None:
    resources = _all_resources()
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
                if env["name"].startswith("MAAS_"):
                    assert env["name"] in known, f"{owner}: {env['name']} is no maas setting"
            for module in _python_m(container.get("command")):
                assert _module_exists(module), f"{owner}: no module {module}"


# Kubernetes: security ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_security(name: str) -> None:
    pod = _find("Deployment", name)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    values = {variable: e.get("value") for variable, e in env.items()}
    # Secure by default: MAAS_INSECURE unset or false, so the service refuses to start without TLS.
    assert not _is_true(values.get("MAAS_INSECURE", "false"))
    # TLS and the key file from the Secrets, mounted read-only, as directories (so key revocation reaches
    # the running services).
    files = {
        "MAAS_TLS_CERT_FILE": ("maas-tls", "tls.crt"),
        "MAAS_TLS_KEY_FILE": ("maas-tls", "tls.key"),
        "MAAS_TLS_CA_FILE": ("maas-tls", "ca.crt"),
        "MAAS_AUTH_KEYS_FILE": ("maas-api-keys", "keys.json"),
    }
    for variable, source in files.items():
        assert _secret_file(pod, container, values[variable]) == source, variable
    # Users authenticate with keys, not certificates; every service verifies the mesh's certificate name.
    assert values["MAAS_TLS_REQUIRE_CLIENT_CERT"] == "false"
    assert values["MAAS_TLS_SERVER_NAME"] == MESH_NAME
    # The internal token the services accept from each other is the one they send.
    for variable in ("MAAS_INTERNAL_TOKEN", "MAAS_CLIENT_TOKEN"):
        ref = env[variable]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"], ref.get("optional", False)) == ("maas-internal", "token", False)


def test_nothing_runs_insecure() -> None:
    for owner, pod, _ in _pod_specs():
        for container in pod["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            assert "MAAS_AUTH_TOKENS" not in env, f"{owner}: MAAS_AUTH_TOKENS no longer exists"
            insecure = env.get("MAAS_INSECURE", {})
            assert "valueFrom" not in insecure and not _is_true(insecure.get("value")), f"{owner}: MAAS_INSECURE"


def test_no_credential_in_the_manifests() -> None:
    for path in [*MANIFESTS, K8S / "kustomization.yaml"]:
        text = path.read_text()
        for credential in DEVELOPMENT_CREDENTIALS:
            assert credential not in text, f"{path.name} holds the development credential {credential!r}"
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert not kustomization.get("secretGenerator"), "Secrets are created out of band, not generated from files"
    for doc in _all_resources():
        name = f"{doc['kind']} {doc['metadata']['name']}"
        # A Secret with a value in the repository is a published credential.
        if doc["kind"] == "Secret":
            assert not doc.get("data") and not doc.get("stringData"), f"{name} holds a value"
        for string in _strings(doc):
            assert not URL_PASSWORD.search(string), f"{name}: a URL with a password"
    for owner, pod, _ in _pod_specs():
        for container in pod["containers"]:
            for env in container.get("env", []):
                if CREDENTIAL_NAME.search(env["name"]):
                    assert "value" not in env, f"{owner}: {env['name']} is a literal; take it from a Secret"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_secrets_are_required_and_created_out_of_band(path: Path) -> None:
    comments = _comments(path)
    readme = (DEPLOY / "README.md").read_text()
    for owner, pod, _ in _pod_specs(_documents(path)):
        for secret, optional in _secret_refs(pod):
            # An optional credential would let a pod start without it; only a Secret whose absence opens
            # nothing may be optional.
            assert not optional or secret in OPTIONAL_SECRETS, f"{owner}: Secret {secret} is optional"
            created = re.compile(rf"kubectl -n maas create secret \w+ {re.escape(secret)}(?![\w-])")
            assert created.search(comments), f"{path.name} does not say how to create the Secret {secret}"
            assert created.search(readme), f"deploy/README.md does not say how to create the Secret {secret}"
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                # The default, 0644, would let any user of the container read keys.
                assert volume["secret"].get("defaultMode", 0o644) & 0o007 == 0, f"{owner}: {volume['name']}"


def test_ray_pods_hold_the_files_the_scheduler_hands_its_actors() -> None:
    # The scheduler passes its TLS and key file paths to its actors (their servers require mutual TLS):
    # every Ray pod must hold the same Secrets at the same paths.
    scheduler_pod = _find("Deployment", "scheduler")["spec"]["template"]["spec"]
    (scheduler,) = scheduler_pod["containers"]
    scheduler_env = {e["name"]: e for e in scheduler["env"]}
    ray_pods = [(owner, pod) for owner, pod, _ in _pod_specs() if owner.startswith("RayCluster ")]
    assert ray_pods
    for owner, pod in ray_pods:
        container = pod["containers"][0]
        for variable in ("MAAS_TLS_CERT_FILE", "MAAS_TLS_KEY_FILE", "MAAS_TLS_CA_FILE", "MAAS_AUTH_KEYS_FILE"):
            path = scheduler_env[variable]["value"]
            assert _secret_file(pod, container, path) == _secret_file(scheduler_pod, scheduler, path), owner
        # Ray's own token authentication, with the scheduler's token.
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == scheduler_env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"] == scheduler_env["RAY_AUTH_TOKEN"]["valueFrom"]
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "ray-auth"


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


def test_compose_runs_maas_in_development_mode(compose: dict[str, Any]) -> None:
    # Compose is for local development: maas's development mode is set explicitly, never implied, and the
    # ports it serves are on loopback only (test_compose_host_ports_do_not_collide).
    for name in SERVICES:
        environment = compose["services"][name]["environment"]
        assert environment["MAAS_INSECURE"] == "true", name
    for name, service in compose["services"].items():
        assert "MAAS_AUTH_TOKENS" not in service.get("environment", {}), f"{name}: MAAS_AUTH_TOKENS no longer exists"


def test_compose_holds_no_credential(compose: dict[str, Any]) -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    for credential in DEVELOPMENT_CREDENTIALS:
        assert credential not in text, f"compose.yaml holds the development credential {credential!r}"
    # Every password in a URL, anywhere (environment, commands, health checks), is a required variable.
    for string in _strings(compose):
        for password in URL_PASSWORD.findall(string):
            _required_variable(password)
    services = compose["services"]
    for name, service in services.items():
        environment = service.get("environment", {})
        assert isinstance(environment, dict), f"{name}: write the environment as a mapping"
        for variable, value in environment.items():
            if CREDENTIAL_NAME.search(variable) and not URL_PASSWORD.search(str(value)):
                assert _required_variable(str(value)), f"{name}: {variable}"
    # One variable per secret, wherever it is used.
    postgres = _required_variable(services["postgres"]["environment"]["POSTGRES_PASSWORD"])
    for name in ("registry", "scheduler"):
        (password,) = URL_PASSWORD.findall(services[name]["environment"][f"MAAS_{name.upper()}_DATABASE_URL"])
        assert _required_variable(password) == postgres, name
    minio = _required_variable(services["minio"]["environment"]["MINIO_ROOT_PASSWORD"])
    (password,) = URL_PASSWORD.findall(services["minio-init"]["environment"]["MC_HOST_maas"])
    assert _required_variable(password) == minio
    assert _required_variable(services["registry"]["environment"]["AWS_SECRET_ACCESS_KEY"]) == minio
    assert _required_variable(services["scheduler"]["environment"]["RAY_AUTH_TOKEN"]) not in {postgres, minio}


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
