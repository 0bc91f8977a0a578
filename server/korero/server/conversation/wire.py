"""Stored records and engine values as `korero.chat.v1` messages, in one place."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2

from korero.chat.v1 import chat_pb2 as pb
from korero.server.conversation.tools_loop import tool_call_record_to_pb
from korero.server.errors import KoreroError
from korero.server.llm.provider import TokenUsage
from korero.server.policy.ratelimit import Admission
from korero.server.storage.records import SessionRecord, StoredMessage

__all__ = [
    "FINISH_REASONS",
    "duration",
    "error_event_body",
    "message_to_pb",
    "metadata_to_pb",
    "rate_limit_status",
    "session_to_pb",
    "timestamp",
    "usage_to_pb",
]

FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "content_filter": pb.FINISH_REASON_CONTENT_FILTER,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def duration(seconds: float) -> duration_pb2.Duration:
    """A non-negative duration."""
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(max(0.0, seconds) * 1e9))
    return d


def metadata_to_pb(meta: Mapping[str, Any]) -> pb.SessionMetadata:
    """Stored metadata as the API's `SessionMetadata`."""
    return pb.SessionMetadata(
        customer_name=meta.get("customer_name", ""),
        booking_reference=meta.get("booking_reference", ""),
        locale=meta.get("locale", ""),
        attributes=meta.get("attributes") or {},
    )


def session_to_pb(record: SessionRecord) -> pb.Session:
    """A stored session as the API's `Session`."""
    return pb.Session(
        session_id=record.session_id,
        metadata=metadata_to_pb(record.metadata),
        create_time=timestamp(record.created_at),
        update_time=timestamp(record.updated_at),
        last_seq=record.last_seq,
        turn_count=record.turn_count,
        message_count=record.message_count,
    )


def message_to_pb(message: StoredMessage) -> pb.Message:
    """A stored message as the API's `Message`."""
    role = pb.ROLE_USER if message.role == "user" else pb.ROLE_ASSISTANT
    out = pb.Message(
        role=pb.ROLE_AGENT if message.agent else role,
        text=message.text,
        turn_id=message.turn_id,
        client_message_id=message.client_message_id,
        create_time=timestamp(message.created_at),
        agent_display_name=message.agent,
        tool_calls=[tool_call_record_to_pb(c) for c in message.tool_calls],
    )
    if message.sentiment is not None:
        out.sentiment.score = message.sentiment
        if message.trend is not None:
            out.sentiment.trend = message.trend
    return out


def usage_to_pb(usage: TokenUsage) -> pb.Usage:
    return pb.Usage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        total_tokens=usage.total_tokens,
        estimated=usage.estimated,
    )


def rate_limit_status(admission: Admission) -> pb.RateLimitStatus:
    """The caller's remaining budget, sent at the start of every turn."""
    return pb.RateLimitStatus(
        remaining_requests=admission.remaining_requests,
        remaining_tokens=admission.remaining_tokens,
        reset_after=duration(admission.reset_after),
        limit=admission.closest,
    )


def error_event_body(error: KoreroError, client_message_id: str = "") -> pb.TurnError:
    """A `KoreroError` as the `error` event body."""
    body = pb.TurnError(
        code=error.code.value[0],
        reason=error.reason,
        message=error.message,
        retryable=error.retryable,
        client_message_id=client_message_id,
    )
    if error.retry_after is not None:
        body.retry_after.CopyFrom(duration(error.retry_after))
    return body
