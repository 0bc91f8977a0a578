"""Running several Lua scripts in one round trip."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.commands.core import AsyncScript

__all__ = ["ScriptCall", "run_scripts"]


@dataclass(frozen=True)
class ScriptCall:
    """One invocation of a registered script."""

    script: AsyncScript
    keys: Sequence[str]
    args: Sequence[Any]


async def run_scripts(client: aioredis.Redis, calls: Sequence[ScriptCall]) -> list[Any]:
    """Run `calls` in one pipeline (one round trip), returning their results.

    Scripts are sent by SHA; a script the server does not know (first use,
    or Redis restarted) is loaded and that call alone is run again.
    """
    async with client.pipeline(transaction=False) as pipe:
        for call in calls:
            pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
        results: list[Any] = await pipe.execute(raise_on_error=False)
    for i, (call, result) in enumerate(zip(calls, results, strict=True)):
        if isinstance(result, rexc.NoScriptError):
            results[i] = await call.script(keys=list(call.keys), args=list(call.args))
        elif isinstance(result, Exception):
            raise result
    return results
