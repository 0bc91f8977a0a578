"""Deployment checks: a test that needs an external validator says so with
`@pytest.mark.needs_binary("NAME")`, and fails (never skips) when it is
missing, so CI cannot pass without having validated anything."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.deploy.tools import INSTALL_HINTS, find_tool


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs_binary(name): the test runs this validator; it fails when missing"
    )


def _require(name: str) -> Path:
    path = find_tool(name)
    if path is None:
        pytest.fail(f"{name} is missing: install {INSTALL_HINTS[name]}", pytrace=False)
    return path


@pytest.fixture(autouse=True)
def _needed_binaries_present(request: pytest.FixtureRequest) -> None:
    for marker in request.node.iter_markers("needs_binary"):
        _require(marker.args[0])


@pytest.fixture
def tool() -> Callable[[str], Path]:
    """The path of a validator; the test fails if it is not installed."""
    return _require
