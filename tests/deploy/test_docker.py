"""deploy/docker/Dockerfile and .dockerignore, checked without a Docker daemon
(none runs here): hadolint, the stages' shape, and the build context."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.deploy.build_context import DockerIgnore, context_files
from tests.deploy.tools import REPO, run

DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def _stages(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, instructions with continuations joined."""
    logical = re.sub(r"\\\n", " ", text)
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in logical.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else ""
            stages.append(Stage(base, name))
        elif not stages:
            if keyword == "ARG" and "=" in rest:
                key, _, value = rest.partition("=")
                args[key] = value
        else:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return _stages(DOCKERFILE.read_text())[1]


@pytest.mark.needs_binary("hadolint")
def test_hadolint_reports_nothing(tool: Callable[[str], Path]) -> None:
    result = run(tool("hadolint"), "--no-color", DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


@pytest.mark.needs_binary("hadolint")
def test_hadolint_would_flag_an_unpinned_base(tool: Callable[[str], Path], tmp_path: Path) -> None:
    # The check above means something only if hadolint does lint here.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install korero\n")
    result = run(tool("hadolint"), "--no-color", bad)
    assert result.returncode != 0
    assert "DL3006" in result.stdout


def test_every_ignore_in_the_dockerfile_gives_a_reason() -> None:
    for line in DOCKERFILE.read_text().splitlines():
        if "hadolint ignore" in line:
            assert re.search(r"hadolint ignore=\S+\s+\S", line), f"no reason: {line}"


def test_the_stages_build_web_and_wheels_and_ship_a_slim_runtime(stages: list[Stage]) -> None:
    assert [s.name for s in stages] == ["web", "builder", "runtime"]
    builder, runtime = stages[1], stages[2]
    for stage in (builder, runtime):
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?", stage.base), stage.base
    wheel = " ".join(builder.all("RUN"))
    assert "pip wheel" in wheel
    assert "./clients/python" in wheel
    assert "-c constraints.txt" in wheel
    assert "--no-index" in wheel  # the venv is installed from the wheels alone


def test_the_runtime_stage_has_no_build_tools(stages: list[Stage]) -> None:
    runtime = stages[-1]
    runs = " ".join(runtime.all("RUN"))
    for tool_name in ("apt-get", "gcc", "build-essential", "pip install", "npm"):
        assert tool_name not in runs
    sources = [args for args in runtime.all("COPY") if args.startswith("--from=")]
    assert {s.split()[0] for s in sources} == {"--from=builder", "--from=web"}
    # Wheels and sources stay in the builder; only the venv and the page come over.
    assert all(s.split()[1] in ("/opt/korero", "/src/clients/web/dist") for s in sources), sources


def test_the_runtime_runs_as_a_numeric_non_root_user(stages: list[Stage]) -> None:
    users = stages[-1].all("USER")
    assert users, "no USER in the final stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit()
    assert int(uid) != 0


def test_healthcheck_probes_grpc_health_through_the_client_cli(stages: list[Stage]) -> None:
    (check,) = stages[-1].all("HEALTHCHECK")
    options, _, command = check.partition("CMD")
    assert "--interval=" in options
    assert "--timeout=" in options
    argv = json.loads(command)
    assert argv[:2] == ["korero", "health"]
    assert argv[argv.index("--target") + 1] == "127.0.0.1:50051"


def test_ports_entrypoint_and_listen_addresses(stages: list[Stage]) -> None:
    runtime = stages[-1]
    exposed = {port for args in runtime.all("EXPOSE") for port in args.split()}
    assert exposed == {"50051", "8081", "9464"}
    (entrypoint,) = runtime.all("ENTRYPOINT")
    (cmd,) = runtime.all("CMD")
    # Exec form: `korero serve` is PID 1 and receives SIGTERM itself.
    assert json.loads(entrypoint) + json.loads(cmd) == ["korero", "serve"]
    env = " ".join(runtime.all("ENV"))
    assert "KORERO_LISTEN=0.0.0.0:50051" in env
    assert "KORERO_WS_LISTEN=0.0.0.0:8081" in env
    assert "KORERO_METRICS_LISTEN=0.0.0.0:9464" in env


def _copy_sources(stages: list[Stage]) -> list[str]:
    sources = []
    for stage in stages:
        for args in stage.all("COPY"):
            words = shlex.split(args)
            if any(w.startswith("--from=") for w in words):
                continue
            sources += [w for w in words[:-1] if not w.startswith("--")]
    return sources


def test_everything_copied_from_the_context_is_in_it(stages: list[Stage]) -> None:
    files = set(context_files(REPO))
    for copied in _copy_sources(stages):
        source = copied.rstrip("/")
        present = source in files or any(f.startswith(source + "/") for f in files)
        assert present, f"COPY {source}: not in the build context (.dockerignore?)"


def test_the_context_leaves_out_local_state() -> None:
    ignore = DockerIgnore.read(REPO / ".dockerignore")
    for path in (
        ".venv/bin/python",
        ".git/config",
        ".run/redis.pid",
        "clients/web/node_modules/esbuild/package.json",
        "clients/web/dist/app.js",
        "clients/python/korero_client.egg-info/PKG-INFO",
        "server/korero/server/__pycache__/app.cpython-311.pyc",
        "bench/results/ttft.json",
        "tests/conftest.py",
        ".env",
    ):
        assert ignore.excludes(path), path
    for path in ("server/korero/server/app.py", "clients/web/src/main.ts", "kb/sample/baggage.md"):
        assert not ignore.excludes(path), path
