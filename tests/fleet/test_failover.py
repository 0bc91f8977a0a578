"""Three instances behind Envoy under steady load: SIGTERM one, then kill -9 another.

The scenario is `bench/failover.py` (also `python -m bench scenarios --only
failover`); here at a small size, with its table printed and its promises
asserted: every conversation carries on, nothing lost or duplicated.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.failover import FailoverConfig, run_failover
from korero.sim import SimConfig, UpstreamSim

pytestmark = pytest.mark.slow


async def test_sigterm_then_kill_9_loses_and_duplicates_nothing(
    redis_url: str, tmp_path: Path
) -> None:
    async with UpstreamSim(SimConfig(ttft=0.05, tokens_per_second=200, answer_tokens=16)) as sim:
        outcome = await run_failover(
            tmp_path,
            redis_url=redis_url,
            llm_url=sim.base_url,
            config=FailoverConfig(conversations=16, warmup=2.0, deadline=40.0),
        )
    summary = outcome.summary()
    print("\n" + outcome.table())
    assert summary["lost"] == 0
    assert summary["duplicated"] == 0
    assert summary["unanswered"] == 0
    # Every conversation was answered again after the kill, on the instance left.
    killed = outcome.events["kill"]
    recovered = {
        t.conversation for t in outcome.turns if t.outcome == "done" and t.started > killed
    }
    assert len(recovered) == 16
    # The drain is graceful: a turn in flight finishes; a stream that ends says so.
    assert set(summary["sigterm"]["errorKinds"]) <= {"stream:UNAVAILABLE"}
    # The draining and the killed instance both left Envoy's rotation.
    assert "rotation_out_1" in summary["events"]
    assert "rotation_out_2" in summary["events"]
    # The one instance left took all of the load in the end.
    end, at_kill = outcome.requests_per_instance["end"], outcome.requests_per_instance["at kill"]
    third = "korero-3"
    assert end[third] > at_kill[third]
    assert end["korero-1"] == at_kill["korero-1"]
