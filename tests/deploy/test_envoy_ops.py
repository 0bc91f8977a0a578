"""The gateway's ops listener, run for real: the compose and Kubernetes Envoy
configs answer /ready (what the kubelet probes) and /stats/prometheus (what
Prometheus scrapes) on 9902, while the admin interface itself stays on
loopback. Envoy runs on free loopback ports with the servers' addresses
pointed at loopback; the test stops it itself, within seconds."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.tools import REPO

# Each test starts an Envoy process (about a second); `make test-fast` leaves them out.
pytestmark = pytest.mark.slow

CONFIGS = {
    "compose": REPO / "deploy" / "envoy" / "envoy.yaml",
    "kubernetes": REPO / "deploy" / "k8s" / "base" / "envoy-config.yaml",
}
START_SECONDS = 15.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _on_loopback(config: dict[str, Any], ports: dict[str, int]) -> dict[str, Any]:
    """The same config with every listener and the admin on free loopback ports."""
    config["admin"]["address"]["socket_address"] = {
        "address": "127.0.0.1",
        "port_value": ports["admin"],
    }
    for listener in config["static_resources"]["listeners"]:
        listener["address"]["socket_address"] = {
            "address": "127.0.0.1",
            "port_value": ports[listener["name"]],
        }
    for cluster in config["static_resources"]["clusters"]:
        for group in cluster["load_assignment"]["endpoints"]:
            for endpoint in group["lb_endpoints"]:
                address = endpoint["endpoint"]["address"]["socket_address"]
                if cluster["name"] == "envoy_admin":
                    address["port_value"] = ports["admin"]
                else:
                    address["address"] = "127.0.0.1"
                    address["port_value"] = _free_port()  # nothing listens: hosts unhealthy
    return config


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback only
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture(params=sorted(CONFIGS))
def gateway(
    request: pytest.FixtureRequest, tool: Callable[[str], Path], tmp_path: Path
) -> Iterator[dict[str, int]]:
    ports = {"admin": _free_port(), "korero": _free_port(), "ops": _free_port()}
    config = _on_loopback(yaml.safe_load(CONFIGS[request.param].read_text()), ports)
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "envoy.log"
    proc = subprocess.Popen(
        [str(tool("envoy")), "-c", str(path), "--disable-hot-restart", "-l", "warning",
         "--log-path", str(log)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                if _get(f"http://127.0.0.1:{ports['admin']}/ready")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail(f"Envoy not ready in {START_SECONDS} s: {log.read_text()}")
        ports["config"] = list(CONFIGS).index(request.param)
        yield ports
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.needs_binary("envoy")
def test_ops_listener_answers_ready_and_serves_metrics(gateway: dict[str, int]) -> None:
    ops = f"http://127.0.0.1:{gateway['ops']}"
    assert _get(f"{ops}/ready")[0] == 200
    status, body = _get(f"{ops}/stats/prometheus")
    assert status == 200
    assert 'envoy_cluster_membership_healthy{envoy_cluster_name="korero_grpc"}' in body
    # Only those two paths: the admin interface is not reachable through it.
    assert _get(f"{ops}/quitquitquit")[0] == 404
    assert _get(f"{ops}/config_dump")[0] == 404


@pytest.mark.needs_binary("envoy")
def test_ready_turns_503_once_envoy_fails_its_health(gateway: dict[str, int]) -> None:
    # What the gateway's preStop does first, so readiness drops before SIGTERM.
    request = urllib.request.Request(
        f"http://127.0.0.1:{gateway['admin']}/healthcheck/fail", method="POST"
    )
    with urllib.request.urlopen(request, timeout=2) as response:  # noqa: S310 - loopback only
        assert response.status == 200
    assert _get(f"http://127.0.0.1:{gateway['ops']}/ready")[0] == 503


def _with_admin_port(command: list[str], port: int) -> list[str]:
    return [part.replace("/127.0.0.1/9901", f"/127.0.0.1/{port}") for part in command]


@pytest.mark.needs_binary("envoy")
def test_the_compose_healthcheck_command_reads_ready(gateway: dict[str, int]) -> None:
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    test = compose["services"]["envoy"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    command = _with_admin_port(test[1:], gateway["admin"])
    assert subprocess.run(command, timeout=10, check=False).returncode == 0
    # ... and says unhealthy when Envoy fails its health (LIVE is gone).
    dead = _with_admin_port(test[1:], _free_port())
    assert subprocess.run(dead, timeout=10, check=False, stderr=subprocess.DEVNULL).returncode != 0


@pytest.mark.needs_binary("envoy")
def test_the_gateway_prestop_fails_envoys_health(gateway: dict[str, int]) -> None:
    deployment = yaml.safe_load_all((REPO / "deploy" / "k8s" / "base" / "envoy.yaml").read_text())
    (gateway_deployment,) = [d for d in deployment if d["kind"] == "Deployment"]
    (container,) = gateway_deployment["spec"]["template"]["spec"]["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert "sleep 20" in command[-1]
    quick = [*command[:-1], command[-1].replace("sleep 20", "sleep 0")]
    result = subprocess.run(
        _with_admin_port(quick, gateway["admin"]), timeout=10, check=False, capture_output=True
    )
    assert result.returncode == 0, result.stderr
    assert _get(f"http://127.0.0.1:{gateway['ops']}/ready")[0] == 503
