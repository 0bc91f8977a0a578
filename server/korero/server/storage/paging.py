"""ListMessages paging: the page token format and the merge of PostgreSQL with Redis.

A page token (AIP-158) is opaque to clients: URL-safe base64 of `m:<turn>:<0|1>`,
the position of the last message returned (turn number, 0 for the user's
message and 1 for the answer). Positions, not offsets, so a page stays right
while new messages arrive and while Redis trims its window. This module is
the one place that writes or reads that format.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

from korero.server.errors import InvalidArgumentError
from korero.server.storage.records import StoredMessage

__all__ = [
    "MessageKey",
    "decode_message_cursor",
    "encode_message_cursor",
    "merge_pages",
    "message_key",
]

_MAX_TURN = 2**31 - 1

MessageKey = tuple[int, int]
"""Where a message sits in its session: (turn number, 0 user / 1 answer)."""


def message_key(message: StoredMessage) -> MessageKey:
    return (message.turn_number, 0 if message.role == "user" else 1)


def encode_message_cursor(key: MessageKey) -> str:
    return base64.urlsafe_b64encode(f"m:{key[0]}:{key[1]}".encode()).decode()


def decode_message_cursor(token: str) -> MessageKey | None:
    """The position a token points after; None for the first page."""
    if not token:
        return None
    try:
        kind, turn, order = base64.urlsafe_b64decode(token.encode()).decode().split(":")
        key = (int(turn), int(order))
    except (ValueError, UnicodeDecodeError):
        kind, key = "", (-1, -1)
    # Turn numbers are int4 in PostgreSQL: a larger one was never issued (and would
    # fail the query as "history unavailable" instead of as a bad token).
    if kind != "m" or not 0 <= key[0] <= _MAX_TURN or key[1] not in (0, 1):
        raise InvalidArgumentError("INVALID_PAGE_TOKEN", "page_token was not issued by this server")
    return key


def merge_pages(
    older: Sequence[StoredMessage],
    window: Sequence[StoredMessage],
    after: MessageKey | None,
    limit: int,
) -> list[StoredMessage]:
    """Messages after `after` from both sources, each once, in order, at most `limit`.

    PostgreSQL (`older`) holds everything written so far; the Redis `window`
    holds the latest messages, some maybe not yet written. A user message is
    one per client_message_id whichever turn it is filed under.
    """
    seen_users: set[str] = set()
    by_key: dict[MessageKey, StoredMessage] = {}
    for message in (*older, *window):
        key = message_key(message)
        if after is not None and key <= after:
            continue
        if message.role == "user" and message.client_message_id:
            if message.client_message_id in seen_users:
                continue
            seen_users.add(message.client_message_id)
        by_key.setdefault(key, message)
    return [by_key[k] for k in sorted(by_key)][:limit]
