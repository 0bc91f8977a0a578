"""Context assembly: the message list sent to the model for a turn.

This is the seam where knowledge-base retrieval, routing and token budgets
plug in later; today it puts the system prompt, the session's metadata and
the recent history (which ends with the user's new message) in order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from korero.server.store import StoredMessage

__all__ = ["ContextAssembler", "PromptAssembler"]

_METADATA_LABELS = (
    ("customer_name", "Customer name"),
    ("booking_reference", "Booking reference"),
    ("locale", "Customer locale"),
)


class ContextAssembler(Protocol):
    """Builds the model's message list for one turn."""

    def assemble(
        self, metadata: Mapping[str, Any], history: Sequence[StoredMessage]
    ) -> list[dict[str, str]]: ...


class PromptAssembler:
    """System prompt + session facts + recent history."""

    def __init__(self, system_prompt: str) -> None:
        self._system_prompt = system_prompt

    def assemble(
        self, metadata: Mapping[str, Any], history: Sequence[StoredMessage]
    ) -> list[dict[str, str]]:
        facts = [
            f"{label}: {metadata[key]}" for key, label in _METADATA_LABELS if metadata.get(key)
        ]
        attributes = metadata.get("attributes") or {}
        facts += [f"{k}: {v}" for k, v in sorted(attributes.items())]
        system = self._system_prompt
        if facts:
            system += "\n\nFacts about this customer:\n" + "\n".join(facts)
        messages = [{"role": "system", "content": system}]
        messages += [{"role": m.role, "content": m.text} for m in history]
        return messages
