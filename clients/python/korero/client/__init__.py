"""Kōrero's Python client: an async `ChatClient` (and `AgentDesk`) over the generated stubs."""

from __future__ import annotations

from korero.client._agent import AgentDesk
from korero.client._client import ChatClient, Conversation
from korero.client._errors import ChatError
from korero.client._retry import Reconnect

__all__ = ["AgentDesk", "ChatClient", "ChatError", "Conversation", "Reconnect"]
