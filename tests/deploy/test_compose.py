"""deploy/compose.yaml, parsed and checked service by service (no Docker here)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from korero.server.settings import env_reference
from tests.deploy.tools import REPO, run

COMPOSE = REPO / "deploy" / "compose.yaml"
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def _one_shot(name: str, services: dict[str, dict[str, Any]]) -> bool:
    """A job others wait to *finish* (restart "no"); it has nothing to health-check."""
    waited_for = {
        dep
        for svc in services.values()
        for dep, spec in (svc.get("depends_on") or {}).items()
        if spec.get("condition") == "service_completed_successfully"
    }
    return name in waited_for and services[name].get("restart") == "no"


def _seconds(text: str) -> float:
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text):
        total += float(amount) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def test_the_stack_has_every_part_the_issue_names(services: dict[str, dict[str, Any]]) -> None:
    assert {"redis", "postgres", "korero", "upstream-sim", "envoy", "prometheus"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres:15")
    assert services["korero"]["deploy"]["replicas"] >= 3


def test_every_service_has_an_image_or_a_build(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            build = svc["build"]
            context = (COMPOSE.parent / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), name
        else:
            assert re.search(r":[\w.-]+$", svc["image"]), f"{name}: pin the image's tag"


def test_every_long_running_service_has_a_healthcheck(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, svc in services.items():
        if _one_shot(name, services):
            assert "healthcheck" not in svc, name
            continue
        check = svc.get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        for key in ("interval", "timeout", "retries"):
            assert key in check, f"{name}: healthcheck without {key}"
        assert _seconds(check["timeout"]) < _seconds(check["interval"]) + 1, name


def test_every_service_declares_its_ports(services: dict[str, dict[str, Any]]) -> None:
    published: list[str] = []
    for name, svc in services.items():
        if _one_shot(name, services):
            continue
        ports = [str(p) for p in svc.get("ports", [])] + [str(p) for p in svc.get("expose", [])]
        assert ports, f"{name} declares no port"
        for mapping in svc.get("ports", []):
            host, _, _ = str(mapping).rpartition(":")
            # Authentication is off in this stack: publish on loopback only.
            assert host.startswith("127.0.0.1:"), f"{name}: {mapping}"
            published.append(host)
        if svc.get("deploy", {}).get("replicas", 1) > 1:
            assert "ports" not in svc, f"{name}: replicas cannot share a host port"
    assert len(published) == len(set(published)), published


def test_the_korero_ports_match_the_image_and_the_healthcheck(
    services: dict[str, dict[str, Any]],
) -> None:
    korero = services["korero"]
    assert set(korero["expose"]) == {"50051", "8081", "9464"}
    test = korero["healthcheck"]["test"]
    assert test[1:3] == ["korero", "health"]
    assert test[test.index("--target") + 1] == "127.0.0.1:50051"


def test_depends_on_uses_conditions_on_existing_services(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, svc in services.items():
        deps = svc.get("depends_on")
        if deps is None:
            continue
        assert isinstance(deps, dict), f"{name}: the list form has no conditions"
        for dep, spec in deps.items():
            assert dep in services, f"{name} -> {dep}"
            assert spec["condition"] in CONDITIONS, f"{name} -> {dep}"
            if _one_shot(dep, services):
                assert spec["condition"] == "service_completed_successfully"
            else:
                assert spec["condition"] == "service_healthy", f"{name} -> {dep}"
    assert set(services["korero"]["depends_on"]) >= {
        "redis",
        "postgres",
        "migrate",
        "upstream-sim",
        "kb-ingest",
        "tools-add",
    }
    assert "korero" in services["envoy"]["depends_on"]


def test_the_schema_is_migrated_before_any_instance_starts(
    services: dict[str, dict[str, Any]],
) -> None:
    migrate = services["migrate"]
    korero = services["korero"]
    # The server's own image and the `korero db migrate` command (the image's
    # entrypoint is `korero`), against the PostgreSQL the instances use.
    assert migrate["image"] == korero["image"]
    assert migrate["build"] == korero["build"]
    assert migrate["command"] == ["db", "migrate"]
    assert migrate["restart"] == "no"
    assert (
        migrate["environment"]["KORERO_POSTGRES_URL"]
        == (korero["environment"]["KORERO_POSTGRES_URL"])
    )
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name, svc in services.items():
        if svc.get("image") == korero["image"] and svc.get("command", [None])[0] == "serve":
            assert svc["depends_on"]["migrate"] == {
                "condition": "service_completed_successfully"
            }, name


def test_start_order_has_no_cycle(services: dict[str, dict[str, Any]]) -> None:
    done: set[str] = set()
    for _ in range(len(services)):
        ready = {
            n
            for n, s in services.items()
            if n not in done and set(s.get("depends_on") or {}) <= done
        }
        done |= ready
    assert done == set(services)


def test_korero_settings_are_real_setting_names(services: dict[str, dict[str, Any]]) -> None:
    known = {name.split(" / ")[0] for name, _, _ in env_reference()}
    known |= {alias for name, _, _ in env_reference() for alias in name.split(" / ")}
    for name in ("korero", "migrate", "kb-ingest", "tools-add"):
        env = services[name]["environment"]
        unknown = set(env) - known
        assert not unknown, f"{name}: {unknown}"
    env = services["korero"]["environment"]
    assert env["REDIS_URL"].startswith("redis://redis:")
    assert "@postgres:5432/" in env["KORERO_POSTGRES_URL"]
    assert "upstream-sim:8088" in env["KORERO_LLM_BASE_URL"]
    tools = services["tools-add"]["command"]
    assert tools[tools.index("--endpoint-base") + 1] == "http://airline-api:8090"


def test_docker_waits_for_the_drain(services: dict[str, dict[str, Any]]) -> None:
    korero = services["korero"]
    grace = float(korero["environment"]["KORERO_SHUTDOWN_GRACE"])
    # SIGTERM -> turns get `grace` -> 1 s server stop; then Docker may SIGKILL.
    assert _seconds(korero["stop_grace_period"]) > grace + 1 + 3


def test_mounted_files_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source}"


def test_prometheus_scrapes_the_replicas_and_envoy(services: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    (dns,) = jobs["korero"]["dns_sd_configs"]
    assert dns["names"] == ["korero"]
    assert str(dns["port"]) in services["korero"]["expose"]
    assert jobs["envoy"]["static_configs"][0]["targets"] == ["envoy:9902"]
    assert "9902" in services["envoy"]["expose"]


@pytest.mark.needs_binary("envoy")
def test_the_compose_envoy_config_is_valid(tool: Callable[[str], Path]) -> None:
    config = REPO / "deploy" / "envoy" / "envoy.yaml"
    result = run(tool("envoy"), "--mode", "validate", "-c", config, "--disable-hot-restart")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout
    clusters = {
        c["name"]: c for c in yaml.safe_load(config.read_text())["static_resources"]["clusters"]
    }
    endpoint = clusters["korero_grpc"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert endpoint["endpoint"]["address"]["socket_address"]["address"] == "korero"


def test_replicated_servers_run_one_worker_each(services: dict[str, dict[str, Any]]) -> None:
    # `korero serve` starts one worker per core by default; three replicas on one
    # host would each start that many and share the same cores.
    servers = [s for s in services.values() if s.get("command", [None])[0] == "serve"]
    assert servers
    for svc in servers:
        command = svc["command"]
        assert command[command.index("--workers") + 1] == "1", command
