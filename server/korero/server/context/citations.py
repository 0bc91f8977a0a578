"""The citation label: how a knowledge-base source is named, asked for and found.

One format, written and read only here:

    [Source: <document title>, Section <section id>]

The knowledge base labels each retrieved chunk with it (`label`), context
assembly shows the model an example of it (`EXAMPLE`), the engine finds the
labels an answer cites (`cited`), and the simulated upstream finds the
labelled excerpts in a prompt (`EXCERPT`).
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["EXAMPLE", "EXCERPT", "cited", "label"]

_PREFIX: Final = "[Source: "


def label(document_title: str, section: str) -> str:
    """The label of one section of a document."""
    return f"{_PREFIX}{document_title}, Section {section}]"


EXAMPLE: Final = label("Baggage Policy", "2.1")
"""A label as the prompt's answering rules show it."""

_CITED = re.compile(r"\[Source:\s*([^,\]]+),\s*Section\s*([^\]]+)\]")

EXCERPT: Final = re.compile(
    r"^(\[Source: [^\]\n]+\])[^\n]*\n(.+?)(?=\n[ \t]*\n|\Z)", re.MULTILINE | re.DOTALL
)
"""An excerpt in a prompt: its label (group 1) at the start of a line, then its text (group 2)."""


def cited(text: str) -> set[tuple[str, str]]:
    """The (document title, section) pairs an answer cites."""
    return {(title.strip(), section.strip()) for title, section in _CITED.findall(text)}
