"""The chat page in real Chromium (playwright-core), through Envoy, on both routes.

The browser side lives in clients/web/tests/e2e.mjs; this test starts the
real parts around it and checks what the upstream saw.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest

from korero.server.context.knowledge import KnowledgeStore, load_documents
from korero.sim import UpstreamSim
from tests.browser.envoy import ROOT, EnvoyProcess
from tests.helpers import redis_client

CHROMIUM = next(
    (p for p in ("/usr/lib/chromium/chromium", "/usr/bin/chromium") if Path(p).exists()),
    None,
)
NODE = shutil.which("node")
E2E = ROOT / "clients" / "web" / "tests" / "e2e.mjs"
ARTIFACTS = ROOT / "artifacts"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("KORERO_SKIP_BROWSER") == "1", reason="KORERO_SKIP_BROWSER=1"
    ),
]


@pytest.mark.timeout(120)
async def test_chat_page_streams_and_cancels_on_both_routes(
    envoy: EnvoyProcess, sim: UpstreamSim, redis_url: str
) -> None:
    assert CHROMIUM is not None, "Debian chromium is missing: run `make setup`"
    assert NODE is not None, "node is missing: run `make setup`"
    assert (ROOT / "clients" / "web" / "dist" / "app.js").exists(), "run `make web` first"
    # The sample knowledge base, so a policy answer comes as a list with citations.
    client = redis_client(redis_url)
    try:
        await KnowledgeStore(client).ingest("default", load_documents(ROOT / "kb" / "sample"))
    finally:
        await client.aclose()
    proc = await asyncio.create_subprocess_exec(
        NODE,
        str(E2E),
        env={
            **os.environ,
            "KORERO_PAGE_URL": envoy.url,
            "KORERO_SIM_URL": sim.base_url.removesuffix("/v1") + "/",
            "KORERO_ARTIFACTS": str(ARTIFACTS),
            "CHROMIUM": CHROMIUM,
        },
        cwd=E2E.parent,
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
    results = json.loads(next(line[4:] for line in text.splitlines() if line.startswith("E2E ")))
    assert results["consoleErrors"] == []
    for route in ("grpc-web", "websocket"):
        assert results[route]["answered"]["deltas"] >= 2
        assert (ARTIFACTS / f"browser-{route}.png").stat().st_size > 1000
    assert results["markdown"]["items"] >= 1
    assert results["markdown"]["source"].startswith("Baggage Policy, Section 2.1")
    # Six turns reached the upstream: two answered in full, two cut off by the
    # cancel, then the policy answer and the one with HTML in it.
    chats = [r for r in sim.requests if r.body.get("messages")]
    assert len(chats) == 6
    assert [r.finished_at is not None for r in chats] == [True, False, True, False, True, True]
    assert [r.disconnected_at is not None for r in chats] == [0, 1, 0, 1, 0, 0]
