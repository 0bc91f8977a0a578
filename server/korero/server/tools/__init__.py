"""Tools: tenant-configured HTTP endpoints the model may call for live data.

`ToolSpec` is one tool (schema, endpoint, limits, intents, privacy flags);
`ToolRegistry` keeps each tenant's tools in Redis; `ToolExecutor` runs one
call and turns every outcome into a `ToolResult` the model can explain;
`ToolResultCache` keeps non-personal results in Redis for a short while.
"""

from __future__ import annotations

from korero.server.tools._cache import CachedResult, ToolResultCache
from korero.server.tools._executor import (
    DATA_NOTICE,
    ToolCall,
    ToolExecutor,
    ToolResult,
    ToolStatus,
)
from korero.server.tools._registry import ToolRegistry, tools_key
from korero.server.tools._spec import (
    DEFAULT_MAX_RESULT_BYTES,
    DEFAULT_TIMEOUT,
    SESSION_FACTS,
    SessionFact,
    ToolSpec,
    ToolSpecError,
)

__all__ = [
    "DATA_NOTICE",
    "DEFAULT_MAX_RESULT_BYTES",
    "DEFAULT_TIMEOUT",
    "SESSION_FACTS",
    "CachedResult",
    "SessionFact",
    "ToolCall",
    "ToolExecutor",
    "ToolRegistry",
    "ToolResult",
    "ToolResultCache",
    "ToolSpec",
    "ToolSpecError",
    "ToolStatus",
    "tools_key",
]
