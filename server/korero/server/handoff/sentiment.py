"""Sentiment of customer messages: VADER per message, and a trend over the last ones.

`vaderSentiment` is a maintained lexicon-and-rules analyzer tuned for short,
informal text (caps, "!!!", "not good" are understood); scoring a message
takes tens of microseconds and needs no model files, so every message is
scored. The compound score runs from -1 (most negative) to 1.

Numbers are taken out before scoring: VADER's lexicon reads some as slang
("187" scores -0.62), and in support chats numbers are flight numbers,
booking references and prices, which say nothing about mood.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

__all__ = ["SentimentAnalyzer", "SentimentReading", "trend"]

_NUMBER = re.compile(r"(?<![\w])[+-]?\d[\d.,:/-]*(?![\w])")


@dataclass(frozen=True)
class SentimentReading:
    """A message's score and the trend it makes with the messages before it."""

    score: float
    trend: float
    window: int
    """How many scored messages `trend` averages (this one included)."""


def trend(scores: Sequence[float], window: int) -> tuple[float, int]:
    """Mean of the last `window` scores (oldest first) and how many were averaged."""
    recent = list(scores)[-max(1, window) :]
    if not recent:
        return 0.0, 0
    return round(sum(recent) / len(recent), 4), len(recent)


@functools.cache
def _vader() -> SentimentIntensityAnalyzer:
    """VADER's lexicon, read once per process (~25 ms); scoring only reads it."""
    return SentimentIntensityAnalyzer()


class SentimentAnalyzer:
    """Scores text with VADER's compound score."""

    def __init__(self) -> None:
        self._vader = _vader()

    def score(self, text: str) -> float:
        return round(float(self._vader.polarity_scores(_NUMBER.sub(" ", text))["compound"]), 4)

    def read(self, text: str, earlier: Sequence[float], window: int) -> SentimentReading:
        """The reading for `text` after the customer's `earlier` scores (oldest first)."""
        score = self.score(text)
        mean, count = trend([*earlier, score], window)
        return SentimentReading(score, mean, count)
