"""Every Envoy config shipped in deploy/ routes what the tested sidecar config
(envoy/envoy.yaml, which `make lint` validates and the end-to-end tests run)
routes, including every gRPC service in protos/, and passes
`envoy --mode validate`."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.tools import REPO, run, with_test_certificates

SIDECAR = REPO / "envoy" / "envoy.yaml"
# Every file under deploy/ that is an Envoy bootstrap config.
SHIPPED = sorted(
    path
    for path in (REPO / "deploy").rglob("*.yaml")
    if "static_resources:" in path.read_text() and "admin:" in path.read_text()
)


def _routes(path: Path) -> dict[str, str]:
    """Route prefix -> cluster of the public listener (the first one)."""
    config = yaml.safe_load(path.read_text())
    listener = config["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (host,) = hcm["route_config"]["virtual_hosts"]
    return {r["match"]["prefix"]: r["route"]["cluster"] for r in host["routes"]}


def _proto_services() -> set[str]:
    services = set()
    for proto in (REPO / "protos").rglob("*.proto"):
        text = proto.read_text()
        package = re.search(r"^package\s+([\w.]+);", text, re.MULTILINE)
        assert package, proto
        for name in re.findall(r"^service\s+(\w+)", text, re.MULTILINE):
            services.add(f"{package.group(1)}.{name}")
    return services


def test_the_shipped_configs_are_found() -> None:
    assert {p.relative_to(REPO).as_posix() for p in SHIPPED} == {
        "deploy/envoy/envoy.yaml",
        "deploy/k8s/base/envoy-config.yaml",
        "deploy/k8s/overlays/prod/envoy-config.yaml",
    }


@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_grpc_service_is_routed_as_the_sidecar_routes_it(config: Path) -> None:
    routes = _routes(config)
    assert routes == _routes(SIDECAR)
    services = _proto_services()
    assert {"korero.chat.v1.ChatService", "korero.agent.v1.AgentDeskService"} <= services
    for service in services:
        assert routes[f"/{service}/"] == "korero_grpc", service
    grpc = yaml.safe_load(config.read_text())["static_resources"]["listeners"][0]
    hcm: dict[str, Any] = grpc["filter_chains"][0]["filters"][0]["typed_config"]
    (host,) = hcm["route_config"]["virtual_hosts"]
    for route in host["routes"]:
        if route["route"]["cluster"] == "korero_grpc":
            # Streams last as long as the conversation or the agent's shift.
            assert route["route"]["timeout"] == "0s", route["match"]


@pytest.mark.needs_binary("envoy")
@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: p.relative_to(REPO).as_posix())
def test_envoy_validates_every_shipped_config(
    tool: Callable[[str], Path], config: Path, tmp_path: Path
) -> None:
    config = with_test_certificates(config, tmp_path)  # the prod gateway's TLS files
    result = run(tool("envoy"), "--mode", "validate", "-c", config, "--disable-hot-restart")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout
