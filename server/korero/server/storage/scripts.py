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

    On a Redis Cluster (`connection.py`) the pipeline is split by node — each
    call goes to the node owning its keys' slot (one slot per call: every key
    of a call shares a hash tag) — and the parts are sent concurrently, so a
    call on a session and one on its tenant's cache still cost one round trip
    of wall time; NOSCRIPT is per node and handled per call the same way.
    EVALSHA is queued through `execute_command` because redis-py's cluster
    pipeline blocks its `evalsha` method (it cannot know which node lacks the
    script); the command itself is routed by its keys like any other.
    """
    async with client.pipeline(transaction=False) as pipe:
        for call in calls:
            pipe.execute_command("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)
        results: list[Any] = await pipe.execute(raise_on_error=False)
    for i, (call, result) in enumerate(zip(calls, results, strict=True)):
        if isinstance(result, rexc.NoScriptError):
            results[i] = await call.script(keys=list(call.keys), args=list(call.args))
        elif isinstance(result, Exception):
            raise result
    return results
