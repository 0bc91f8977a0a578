"""Knowledge base: parsing and chunking, BM25, ingest and versions in real Redis, retrieval."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from korero.server.context.knowledge import (
    KnowledgeBase,
    KnowledgeStore,
    load_documents,
    parse_json,
    parse_markdown,
)
from korero.server.context.retrieval import K1, B, BM25Index, tokenize
from korero.server.settings import KnowledgeSettings
from tests.conftest import RedisProcess
from tests.helpers import SAMPLE_KB, redis_client


def test_markdown_is_chunked_by_numbered_sections() -> None:
    doc = parse_markdown(
        "---\nid: bags\n---\n# Baggage Policy\nIntro text.\n\n## 2 Checked\n"
        "### 2.1 Allowance\nOne bag of 23 kg.\n### Fees and extras\nNZD 45 per bag.\n",
        "fallback-id",
    )
    assert doc.id == "bags"
    assert doc.title == "Baggage Policy"
    assert [(c.section, c.heading) for c in doc.chunks] == [
        ("intro", "Overview"),
        ("2.1", "Allowance"),
        ("fees-and-extras", "Fees and extras"),
    ]
    assert doc.chunks[1].context == "Checked"  # the parent heading is indexed too
    assert doc.chunks[1].id == "bags#2.1"


def test_long_sections_are_split_and_keep_their_id() -> None:
    body = "\n\n".join(f"Paragraph {i} " + "word " * 100 for i in range(5))
    doc = parse_markdown(f"# T\n## 3.2 Long\n{body}\n", "t")
    assert len(doc.chunks) > 1
    assert {c.section for c in doc.chunks} == {"3.2"}
    assert len({c.id for c in doc.chunks}) == len(doc.chunks)
    assert all(len(c.text.split()) <= 220 for c in doc.chunks)


def test_json_documents() -> None:
    (doc,) = parse_json(
        {"id": "l", "title": "Loyalty", "sections": [{"id": "1.1", "heading": "J", "text": "x"}]},
        "file",
    )
    assert (doc.id, doc.title, doc.chunks[0].section) == ("l", "Loyalty", "1.1")


def test_sample_kb_covers_the_five_topics() -> None:
    docs = load_documents(SAMPLE_KB)
    titles = {d.title for d in docs}
    assert titles == {
        "Baggage Policy",
        "Changes and Refunds",
        "Check-in and Boarding",
        "Special Assistance",
        "Aotea Rewards Loyalty Programme",
    }
    assert sum(len(d.chunks) for d in docs) >= 30


def test_bm25_scores_match_the_formula() -> None:
    texts = ["red bag bag", "blue bag", "green hat"]
    index = BM25Index(texts, stem=False)
    n, avg = 3, (3 + 2 + 2) / 3

    def idf(df: int) -> float:
        return math.log(1 + (n - df + 0.5) / (df + 0.5))

    def term(tf: int, length: int, df: int) -> float:
        return idf(df) * tf * (K1 + 1) / (tf + K1 * (1 - B + B * length / avg))

    hits = index.search("red bag", 3)
    assert [h.index for h in hits] == [0, 1]
    assert math.isclose(hits[0].raw, term(1, 3, 1) + term(2, 3, 2))
    assert math.isclose(hits[1].raw, term(1, 2, 2))
    best = (idf(1) + idf(2)) * (K1 + 1)
    assert math.isclose(hits[0].score, round(hits[0].raw / best, 4))
    assert index.search("purple", 3) == []


def test_tokenizer_folds_case_accents_plurals_and_stopwords() -> None:
    assert tokenize("The BAGS were changed, Kōrero!") == ["bag", "chang", "korero"]
    assert tokenize("changing change") == ["chang", "chang"]


async def test_ingest_versions_and_retrieval(redis_proc: RedisProcess, redis_url: str) -> None:
    client = redis_client(redis_url)
    try:
        store = KnowledgeStore(client)
        docs = load_documents(SAMPLE_KB)
        assert await store.version("t1") == 0
        v1 = await store.ingest("t1", docs)
        v2 = await store.ingest("t1", docs)
        assert (v1, v2) == (1, 2)  # a new version on every ingest
        keys = sorted(k.decode() for k in redis_proc.client().keys("kr:{t1:kb}:*"))
        assert keys == ["kr:{t1:kb}:chunks:2", "kr:{t1:kb}:meta"]  # the old version is gone
        assert await store.version("t2") == 0  # per tenant

        kb = KnowledgeBase(store, KnowledgeSettings())
        cases = {
            "What's the checked baggage allowance?": ("Baggage Policy", "2.1"),
            "When does online check-in open?": ("Check-in and Boarding", "1.1"),
            "How do I request a wheelchair?": ("Special Assistance", "1.1"),
            "Do my points expire?": ("Aotea Rewards Loyalty Programme", "3.2"),
            "Can I get a refund on a Flex fare?": ("Changes and Refunds", "2.1"),
        }
        for question, (title, section) in cases.items():
            top = (await kb.relevant("t1", v2, question))[0]
            assert (top.chunk.document_title, top.chunk.section) == (title, section), question
            assert 0 < top.score <= 1
        assert await kb.relevant("t1", v2, "What's the weather like in Paris?") == []
        assert await kb.relevant("t2", 0, "baggage") == []
    finally:
        await client.aclose()


@pytest.mark.slow
async def test_ingest_command_line(redis_url: str, tmp_path: Path) -> None:
    import asyncio  # noqa: PLC0415
    import os  # noqa: PLC0415
    import sys  # noqa: PLC0415

    korero = str(Path(sys.executable).parent / "korero")
    env = {**os.environ, "REDIS_URL": redis_url}
    for args, expected in (
        (["kb", "ingest", str(SAMPLE_KB), "--tenant", "acme"], "kb version 1"),
        (["kb", "search", "checked baggage allowance", "--tenant", "acme"], "Section 2.1]"),
        (["kb", "ingest", str(tmp_path), "--tenant", "acme"], "no *.md or *.json"),
    ):
        proc = await asyncio.create_subprocess_exec(
            korero, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert expected in (out + err).decode(), (out, err)
