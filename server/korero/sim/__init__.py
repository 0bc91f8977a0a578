"""A simulated OpenAI-compatible upstream for tests and benchmarks."""

from __future__ import annotations

from korero.sim._upstream import (
    DEFAULT_MODEL,
    MAX_RECORDED_REQUESTS,
    Fault,
    FaultKind,
    Persona,
    RecordedRequest,
    SimConfig,
    UpstreamSim,
    compose_answer,
    prompt_token_count,
)

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
