"""A human handoff in real Chromium: a customer page and an agent page, through Envoy.

The browser side lives in clients/web/tests/handoff.mjs; this test starts the
real parts around it and checks what the model saw: nothing while a person
owned the conversation.
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from korero.sim import UpstreamSim
from tests.browser.envoy import ROOT, EnvoyProcess
from tests.browser.test_chat_page import ARTIFACTS, CHROMIUM, NODE

SCRIPT = ROOT / "clients" / "web" / "tests" / "handoff.mjs"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("KORERO_SKIP_BROWSER") == "1", reason="KORERO_SKIP_BROWSER=1"
    ),
]


@pytest.mark.timeout(120)
async def test_customer_and_agent_pages_through_a_handoff_and_back(
    envoy: EnvoyProcess, sim: UpstreamSim
) -> None:
    assert CHROMIUM is not None, "Debian chromium is missing: run `make setup`"
    assert NODE is not None, "node is missing: run `make setup`"
    assert (ROOT / "clients" / "web" / "dist" / "agent.js").exists(), "run `make web` first"
    proc = await asyncio.create_subprocess_exec(
        NODE,
        str(SCRIPT),
        env={
            **os.environ,
            "KORERO_PAGE_URL": envoy.url,
            "KORERO_ARTIFACTS": str(ARTIFACTS),
            "CHROMIUM": CHROMIUM,
        },
        cwd=SCRIPT.parent,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 100)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode()
    assert proc.returncode == 0, text
    results = json.loads(
        next(line[8:] for line in text.splitlines() if line.startswith("HANDOFF "))
    )
    assert results["consoleErrors"] == []
    kinds = results["customerKinds"]
    for kind in (
        "handoffRequested",
        "handoffQueued",
        "agentJoined",
        "agentMessage",
        "messageRelayed",
        "agentLeft",
        "handoffEnded",
    ):
        assert kind in kinds, kinds
    assert kinds.index("handoffQueued") < kinds.index("agentJoined") < kinds.index("handoffEnded")
    assert {"joined", "offered", "assigned", "customerMessage", "ended"} <= set(
        results["deskKinds"]
    )
    # One model call: the question after the handoff; the complaint and the
    # message to the agent never reached it.
    chats = [r for r in sim.requests if r.body.get("messages")]
    assert len(chats) == 1
    assert "How many bags" in chats[0].body["messages"][-1]["content"]
    for name in (
        "handoff-agent-offer",
        "handoff-customer-with-agent",
        "handoff-customer-back-to-bot",
    ):
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 1000
