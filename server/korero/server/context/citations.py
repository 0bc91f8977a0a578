"""The citation label: how a knowledge-base source is named, asked for and found.

One format, written and read only here:

    [Source: <document title>, Section <section id>]
    [Source: <data source>, <subject>, <as of>]      live data from a tool

The knowledge base labels each retrieved chunk with it (`label`), context
assembly shows the model an example of it (`EXAMPLE`), the engine finds the
labels an answer cites (`cited`), and the simulated upstream finds the
labelled excerpts in a prompt (`EXCERPT`).
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["EXAMPLE", "EXCERPT", "cited", "data_label", "label", "label_text"]

_PREFIX: Final = "[Source: "


def label(document_title: str, section: str) -> str:
    """The label of one section of a document."""
    return f"{_PREFIX}{document_title}, Section {section}]"


def data_label(source: str, *details: str) -> str:
    """The label of live data from a tool.

    E.g. ``[Source: Flight status service, NZ101, 2026-11-30 14:05]``.
    """
    return _PREFIX + ", ".join(p for p in (source, *details) if p) + "]"


def label_text(citation_label: str) -> str:
    """What is inside a label's brackets (``Flight status service, NZ101, …``)."""
    return citation_label.removeprefix(_PREFIX).removesuffix("]")


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
