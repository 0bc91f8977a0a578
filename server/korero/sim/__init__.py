"""A simulated OpenAI-compatible upstream for tests and benchmarks."""

from __future__ import annotations

from korero.sim._compose import compose_answer, prompt_token_count
from korero.sim._config import (
    DEFAULT_MODEL,
    MAX_RECORDED_REQUESTS,
    Fault,
    FaultKind,
    Persona,
    RecordedRequest,
    SimConfig,
)
from korero.sim._upstream import UpstreamSim

__all__ = [
    "DEFAULT_MODEL",
    "MAX_RECORDED_REQUESTS",
    "Fault",
    "FaultKind",
    "Persona",
    "RecordedRequest",
    "SimConfig",
    "UpstreamSim",
    "compose_answer",
    "prompt_token_count",
]
