"""What the engine accepts from a client, checked before anything is stored."""

from __future__ import annotations

import re
from typing import Any

from korero.chat.v1 import chat_pb2 as pb
from korero.server.errors import InvalidArgumentError

__all__ = ["validate_message", "validate_metadata", "validate_session_id"]

_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MAX_CLIENT_MESSAGE_ID = 128
_MAX_METADATA_VALUE = 256
_MAX_ATTRIBUTES = 32
_MAX_ATTRIBUTE_KEY = 64


def validate_session_id(session_id: str) -> None:
    if not _SESSION_ID.match(session_id):
        raise InvalidArgumentError(
            "SESSION_ID_INVALID", "session_id must be 1-64 characters of A-Z a-z 0-9 _ -"
        )


def validate_metadata(metadata: pb.SessionMetadata) -> dict[str, Any]:
    """The metadata as a plain dict with only the fields that are set; bounded in size."""
    out: dict[str, Any] = {}
    for name in ("customer_name", "booking_reference", "locale"):
        value = getattr(metadata, name)
        if len(value) > _MAX_METADATA_VALUE:
            raise InvalidArgumentError(
                "METADATA_TOO_LARGE", f"{name} is longer than {_MAX_METADATA_VALUE} characters"
            )
        if value:
            out[name] = value
    if len(metadata.attributes) > _MAX_ATTRIBUTES:
        raise InvalidArgumentError(
            "METADATA_TOO_LARGE", f"more than {_MAX_ATTRIBUTES} metadata attributes"
        )
    for key, value in metadata.attributes.items():
        if len(key) > _MAX_ATTRIBUTE_KEY or len(value) > _MAX_METADATA_VALUE:
            raise InvalidArgumentError(
                "METADATA_TOO_LARGE", f"metadata attribute {key[:64]!r} is too long"
            )
    if metadata.attributes:
        out["attributes"] = dict(metadata.attributes)
    return out


def validate_message(message: pb.UserMessage, max_bytes: int) -> None:
    """A user message needs an idempotency key and 1..`max_bytes` bytes of text."""
    cmid = message.client_message_id
    if not cmid:
        raise InvalidArgumentError(
            "CLIENT_MESSAGE_ID_REQUIRED", "client_message_id is required (an idempotency key)"
        )
    if len(cmid) > _MAX_CLIENT_MESSAGE_ID:
        raise InvalidArgumentError(
            "CLIENT_MESSAGE_ID_INVALID",
            f"client_message_id is longer than {_MAX_CLIENT_MESSAGE_ID} characters",
        )
    if not message.text.strip():
        raise InvalidArgumentError("MESSAGE_EMPTY", "message text is empty")
    size = len(message.text.encode())
    if size > max_bytes:
        raise InvalidArgumentError(
            "MESSAGE_TOO_LARGE", f"message is {size} bytes; the limit is {max_bytes}"
        )
