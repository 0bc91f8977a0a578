"""Lexical retrieval: Okapi BM25 over knowledge-base chunks, in memory.

Why BM25 and not embeddings: on the labelled question set in
docs/retrieval.md it finds the right section as often as the packaged
MiniLM model does, in microseconds instead of milliseconds, with no model
files and no 1.5 GB torch install (CI time). The index is a plain inverted
index (term -> postings); scoring touches only the postings of the query's
terms, so a query over thousands of chunks takes well under a millisecond.

Scores: raw BM25 with Lucene's idf, `log(1 + (N - n + 0.5) / (n + 0.5))`,
k1 = 1.2, b = 0.75. `Hit.score` is that raw score divided by the most the
query could score (every query term with infinite term frequency; a term
the index has never seen counts with the idf of an unseen term), so it lies
in 0..1 and one relevance threshold works across knowledge bases of any
size.
"""

from __future__ import annotations

import heapq
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["BM25Index", "Hit", "tokenize"]

K1 = 1.2
B = 0.75

_WORD = re.compile(r"[a-z0-9]+")
_CONTRACTION = re.compile(r"['’](s|re|ve|ll|d|m|t)\b")
_STOPWORD_TEXT = """a about above after again all am an and any are as at be been before being
below between both but by can could did do does doing down during each few for from further
had has have having he her here hers him his how i if in into is it its itself just let me
more most my myself no nor not now of off on once only or other our ours out over own please
same she should so some such than that the their theirs them then there these they this
those through to too under until up very was we were what when where which while who whom
why will with would you your yours yourself hi hello hey thanks thank get got want need
know tell"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())


def _stem(word: str) -> str:
    """A light suffix stripper: plurals, -ing, -ed, final -e (enough to match bag/bags,
    change/changed/changing, refund/refunds/refundable is left alone on purpose)."""
    if len(word) <= 3 or word.isdigit():
        return word
    if word.endswith("ies") and len(word) > 4:
        word = word[:-3] + "y"
    elif word.endswith(("sses", "xes", "ches", "shes")):
        word = word[:-2]
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    if word.endswith("ing") and len(word) > 5:
        word = word[:-3]
    elif word.endswith("ed") and len(word) > 4:
        word = word[:-2]
    if word.endswith("e") and len(word) > 4:
        word = word[:-1]
    if len(word) > 4 and word[-1] == word[-2] and word[-1] not in "lsz":
        word = word[:-1]
    return word


def tokenize(text: str, *, stem: bool = True) -> list[str]:
    """Lower-cased words without stopwords, lightly stemmed."""
    folded = unicodedata.normalize("NFKD", text.casefold())
    folded = "".join(c for c in folded if not unicodedata.combining(c))
    folded = _CONTRACTION.sub("", folded)
    words = [w for w in _WORD.findall(folded) if len(w) > 1 and w not in STOPWORDS]
    return [_stem(w) for w in words] if stem else words


@dataclass(frozen=True)
class Hit:
    """A retrieved chunk: its position in the index and its normalized score."""

    index: int
    score: float
    raw: float


class BM25Index:
    """An immutable BM25 index over a list of texts."""

    def __init__(self, texts: Sequence[str], *, stem: bool = True) -> None:
        self._stem = stem
        postings: dict[str, list[tuple[int, int]]] = {}
        lengths: list[int] = []
        for i, text in enumerate(texts):
            terms = Counter(tokenize(text, stem=stem))
            lengths.append(sum(terms.values()))
            for term, tf in terms.items():
                postings.setdefault(term, []).append((i, tf))
        self._n = len(texts)
        avg = (sum(lengths) / self._n) if self._n else 1.0
        norm = [K1 * (1 - B + B * length / (avg or 1.0)) for length in lengths]
        self._idf = {t: self._idf_of(len(p)) for t, p in postings.items()}
        # Each posting's contribution is fixed once the index is built, so it is
        # computed here and a query only adds numbers up.
        self._weights: dict[str, list[tuple[int, float]]] = {
            term: [(doc, idf * tf * (K1 + 1) / (tf + norm[doc])) for doc, tf in plist]
            for term, plist in postings.items()
            for idf in (self._idf[term],)
        }

    def __len__(self) -> int:
        return self._n

    def _idf_of(self, df: int) -> float:
        return math.log(1 + (self._n - df + 0.5) / (df + 0.5))

    def search(self, query: str, k: int) -> list[Hit]:
        """The `k` best chunks for `query`, best first (ties: earlier chunk first)."""
        terms = set(tokenize(query, stem=self._stem))
        if not terms or not self._n:
            return []
        best_possible = sum(self._idf.get(t, self._idf_of(0)) * (K1 + 1) for t in terms)
        scores: dict[int, float] = {}
        get = scores.get
        for term in terms:
            for doc, weight in self._weights.get(term, ()):
                scores[doc] = get(doc, 0.0) + weight
        ranked = heapq.nsmallest(k, scores.items(), key=lambda item: (-item[1], item[0]))
        return [Hit(doc, round(raw / best_possible, 4), raw) for doc, raw in ranked]
