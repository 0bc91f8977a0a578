"""What makes the simulated upstream answer like a capable support model.

Pure functions of the request, so answers are deterministic:

* `plan_tool_calls`: when the request offers tools and the last user message
  needs live data (a flight number such as NZ101; "my booking", "my flight",
  "my bags"), the calls to make — one per flight number, in parallel — or,
  once a booking has been fetched for a question about the customer's
  flight, the status of its flights (a second round);
* `answer_from_tools`: an answer built only from the structured fields of
  the tool results after the last user message, with each result's source
  label; failed calls are explained. Free text in a result is never obeyed
  (and never quoted unless it is a known field), so a result saying "ignore
  previous instructions" changes nothing;
* `intent_reply`: a short, relevant reply for each intent the server's
  router names in its ``Routing:`` line (small talk, complaint, a request
  for a human, a booking question without tools, an ungroundable policy
  question) — never filler.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "answer_from_tools",
    "detect_intent",
    "guess_intent",
    "intent_reply",
    "plan_tool_calls",
    "tool_results",
]

_FLIGHT = re.compile(r"\b([A-Z]{2}) ?(\d{1,4})\b|\b([a-z]{2})(\d{1,4})\b")
_MINE = re.compile(
    r"\bmy (booking|reservation|itinerary|ticket|trip|flights?|bags?|baggage|allowance|"
    r"seats?|fare)\b|\bbooking reference\b",
    re.IGNORECASE,
)
_FLIGHT_QUESTION = re.compile(
    r"\b(status|delay(ed)?|late|on time|gate|depart(s|ure)?|leave|boarding|cancel+ed)\b|"
    r"\bmy flights?\b",
    re.IGNORECASE,
)
_ROUTING = re.compile(r"^Routing: this message is (.+?)\.?$", re.MULTILINE)
_ROUTING_HINTS = (
    ("small talk", "small_talk"),
    ("request for a human", "human_request"),
    ("complaint", "complaint"),
    ("own booking", "booking_lookup"),
    ("our policies", "policy_question"),
)
_THANKS = re.compile(r"\b(thanks|thank you|cheers)\b", re.IGNORECASE)
_BYE = re.compile(r"\b(bye|goodbye|see you)\b", re.IGNORECASE)
_WHO = re.compile(r"\b(who are you|are you a (bot|robot)|your name)\b", re.IGNORECASE)
_HOW = re.compile(r"\bhow are you\b", re.IGNORECASE)


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def detect_intent(messages: Sequence[Mapping[str, Any]]) -> str | None:
    """The intent named by the server's ``Routing:`` line, if the prompt has one."""
    for message in messages:
        if message.get("role") != "system":
            continue
        match = _ROUTING.search(_text(message.get("content")))
        if match:
            hint = match.group(1)
            return next((intent for key, intent in _ROUTING_HINTS if key in hint), None)
    return None


_GREETING = re.compile(
    r"^\s*(hi|hello|hey|kia ora|good (morning|afternoon|evening)|thanks|thank you|cheers|bye|"
    r"goodbye)\b|\b(how are you|who are you|are you a (bot|robot))\b",
    re.IGNORECASE,
)
_HUMAN = re.compile(r"\b(human|real person|agent|representative|operator|someone real)\b", re.I)
_COMPLAINT = re.compile(
    r"\b(terrible|awful|horrible|worst|unacceptable|ridiculous|useless|appalling|outrageous|"
    r"rude|furious|angry|fed up|disappointed|complain(t|ts|ing)?)\b",
    re.IGNORECASE,
)


def guess_intent(question: str) -> str:
    """The intent of `question` when the prompt names none (a prompt without a Routing line)."""
    if _HUMAN.search(question):
        return "human_request"
    if _COMPLAINT.search(question):
        return "complaint"
    if _GREETING.search(question):
        return "small_talk"
    if _MINE.search(question) or _flight_numbers(question):
        return "booking_lookup"
    return "policy_question"


def _after_last_user(messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[Mapping[str, Any]]]:
    last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    question = _text(messages[last].get("content")) if last >= 0 else ""
    return question, list(messages[last + 1 :])


def tool_results(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The JSON payloads of the tool messages after the last user message, in order.

    Refusals (status ``not_allowed``: a tool this question may not use) are
    left out: they say nothing about the data, so the model carries on as if
    it had not asked — with the tools it is offered, or with a plain reply.
    """
    _, tail = _after_last_user(messages)
    results = []
    for message in tail:
        if message.get("role") != "tool":
            continue
        text = _text(message.get("content"))
        start = text.find("{")
        try:
            payload = json.loads(text[start:]) if start >= 0 else None
        except ValueError:
            payload = None
        if isinstance(payload, dict) and payload.get("status") == "not_allowed":
            continue
        results.append(payload if isinstance(payload, dict) else {"status": "unreadable"})
    return results


def _tool_name(tool: Mapping[str, Any]) -> str:
    fn = tool.get("function")
    return str(fn.get("name", "")) if isinstance(fn, Mapping) else ""


def _flight_tool(tools: Sequence[Mapping[str, Any]]) -> tuple[str, str] | None:
    """(tool name, argument name) of an offered tool that takes a flight number."""
    for tool in tools:
        fn = tool.get("function")
        if not isinstance(fn, Mapping):
            continue
        props = (fn.get("parameters") or {}).get("properties") or {}
        arg = next((p for p in props if "flight" in p.lower()), None)
        if arg:
            return _tool_name(tool), arg
    return None


def _booking_tool(tools: Sequence[Mapping[str, Any]]) -> str | None:
    """An offered tool about the customer's booking that the model calls without arguments."""
    for tool in tools:
        fn = tool.get("function")
        if not isinstance(fn, Mapping):
            continue
        about = f"{fn.get('name', '')} {fn.get('description', '')}".lower()
        required = (fn.get("parameters") or {}).get("required") or []
        if "booking" in about and not required:
            return _tool_name(tool)
    return None


def _flight_numbers(text: str) -> list[str]:
    numbers: list[str] = []
    for m in _FLIGHT.finditer(text):
        number = (m.group(1) or m.group(3)).upper() + (m.group(2) or m.group(4))
        if number not in numbers:
            numbers.append(number)
    return numbers


def plan_tool_calls(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]
) -> list[tuple[str, dict[str, Any]]]:
    """The (tool name, arguments) calls the question needs now; [] to answer instead."""
    if not tools:
        return []
    question, _ = _after_last_user(messages)
    results = tool_results(messages)
    flight_tool = _flight_tool(tools)
    booking_tool = _booking_tool(tools)
    if not results:  # the first round (or only refusals so far)
        calls: list[tuple[str, dict[str, Any]]] = []
        if flight_tool:
            calls += [(flight_tool[0], {flight_tool[1]: n}) for n in _flight_numbers(question)]
        if booking_tool and not calls and _MINE.search(question):
            calls.append((booking_tool, {}))
        return calls
    # A second round: the customer's booking is known and they asked about their flight.
    booked = [r["data"] for r in results if r.get("status") == "ok" and _is_booking(r.get("data"))]
    have_flights = any(_is_flight(r.get("data")) for r in results)
    asked_flight = _FLIGHT_QUESTION.search(question) and not re.search(
        r"\b(bag|baggage|allowance|luggage)", question, re.IGNORECASE
    )
    if booked and flight_tool and not have_flights and asked_flight:
        numbers = [s["flight_number"] for s in booked[0].get("itinerary", [])[:2]]
        return [(flight_tool[0], {flight_tool[1]: n}) for n in numbers]
    return []


def _is_flight(data: object) -> bool:
    return isinstance(data, Mapping) and "flight_number" in data and "status" in data


def _is_booking(data: object) -> bool:
    return isinstance(data, Mapping) and "reference" in data and "itinerary" in data


def _clock(stamp: object) -> str:
    try:
        return dt.datetime.fromisoformat(str(stamp)).strftime("%H:%M")
    except ValueError:
        return "?"


def _day(stamp: object) -> str:
    try:
        when = dt.datetime.fromisoformat(str(stamp))
    except ValueError:
        return "?"
    return f"{when.day} {when:%b} {when:%H:%M}"


def _flight_lines(f: Mapping[str, Any], source: str) -> list[str]:
    number, route = f["flight_number"], f"{f.get('origin')} to {f.get('destination')}"
    status = str(f.get("status", "")).replace("_", " ")
    lines = [f"Flight {number} ({route}) on {_day(f.get('scheduled_departure'))[:6].strip()}:"]
    if status == "cancelled":
        reason = f" because of {f['delay_reason']}" if f.get("delay_reason") else ""
        lines.append(f"- Status: **cancelled**{reason} {source}".rstrip())
        lines.append("- You can rebook on the next available flight or cancel for a full refund.")
        return lines
    if f.get("delay_minutes"):
        reason = f" because of {f['delay_reason']}" if f.get("delay_reason") else ""
        lines.append(f"- Status: **delayed** by {f['delay_minutes']} minutes{reason} {source}")
        lines.append(
            f"- Departure: scheduled {_clock(f.get('scheduled_departure'))}, "
            f"now expected at {_clock(f.get('estimated_departure'))}"
        )
    else:
        lines.append(f"- Status: **{status}** {source}")
        lines.append(f"- Departure: {_clock(f.get('scheduled_departure'))}")
    if f.get("gate"):
        lines.append(f"- Gate: {f['gate']}")
    return lines


def _allowance(fare: str, allowance: Mapping[str, Any]) -> str:
    cabin = allowance.get("cabin") or {}
    checked = allowance.get("checked") or {}
    if "combined_max_kg" in cabin:
        cabin_text = f"{cabin.get('bags')} cabin bags, {cabin['combined_max_kg']} kg combined"
    else:
        cabin_text = f"{cabin.get('bags')} cabin bag up to {cabin.get('max_kg')} kg"
    if cabin.get("personal_item"):
        cabin_text += " plus a personal item"
    bags = checked.get("bags", 0)
    if bags:
        plural, each = ("s", " each") if bags > 1 else ("", "")
        checked_text = f"{bags} checked bag{plural} up to {checked.get('max_kg_each')} kg{each}"
    else:
        checked_text = "no checked bags"
    return f"- Baggage ({fare}): {cabin_text}; {checked_text}"


def _booking_lines(b: Mapping[str, Any], source: str) -> list[str]:
    lines = [
        f"Your booking {b['reference']} for {b.get('passenger_name')} "
        f"({b.get('fare_class')}) {source}:"
    ]
    for segment in b.get("itinerary", []):
        lines.append(
            f"- {segment['flight_number']} {segment.get('origin')} to "
            f"{segment.get('destination')}, departing {_day(segment.get('scheduled_departure'))}"
        )
    lines.append(_allowance(str(b.get("fare_class")), b.get("baggage_allowance") or {}))
    return lines


def answer_from_tools(messages: Sequence[Mapping[str, Any]]) -> str | None:
    """The answer from the tool results after the last user message; None if there are none."""
    results = tool_results(messages)
    if not results:
        return None
    blocks: list[list[str]] = []
    failures: list[str] = []
    for result in results:
        data: Any = result.get("data")
        source = str(result.get("source", ""))
        if result.get("status") == "ok" and _is_booking(data):
            blocks.insert(0, _booking_lines(data, source))
        elif result.get("status") == "ok" and _is_flight(data):
            blocks.append(_flight_lines(data, source))
        else:
            error = str(result.get("error") or "The data service gave no usable answer.")
            failures.append(error if error.endswith(".") else error + ".")
    parts = ["\n".join(block) for block in blocks]
    if failures:
        sorry = "I'm sorry, I couldn't get that information: " + " ".join(failures)
        parts.append(
            sorry + " Please try again in a few minutes, or I can connect you with a human agent."
        )
    return "\n\n".join(parts)


def intent_reply(  # noqa: PLR0911 -- one reply per intent and kind of small talk
    intent: str, question: str, name: str | None, facts: str
) -> str:
    """A short reply for `intent` when neither tools nor excerpts apply."""
    hello = f", {name}" if name else ""
    if intent == "small_talk":
        if _THANKS.search(question):
            return f"You're welcome{hello}! Is there anything else I can help you with?"
        if _BYE.search(question):
            return f"Goodbye{hello}, and thanks for flying with Aotea Air."
        if _WHO.search(question):
            return (
                "I'm the Aotea Air support assistant (a simulated model in this demo). I can "
                "help with baggage, check-in, changes and refunds, your booking and flight status."
            )
        if _HOW.search(question):
            return f"I'm well, thanks for asking{hello}! How can I help you today?"
        return (
            f"Kia ora{hello}! I can help with baggage, check-in, changes and refunds, "
            "your booking or a flight's status. What would you like to know?"
        )
    if intent == "complaint":
        return (
            f"I'm sorry{hello}, that is not the experience we want you to have, and I understand "
            "your frustration. Would you like me to connect you with a human agent who can look "
            "into it and put things right?"
        )
    if intent == "human_request":
        return (
            f"Of course{hello}. I'll connect you with a human agent; please stay in this chat "
            "and an agent will join you shortly."
        )
    if intent == "booking_lookup":
        ref = f" for booking {facts}" if facts else ""
        return (
            f"I'm sorry{hello}, I can't look up live booking or flight data{ref} in this chat "
            "right now. You can check it in Manage Booking, or I can connect you with a human "
            "agent."
        )
    return (
        "I'm sorry, I couldn't find anything about that in our policies, so I won't guess. "
        "I can connect you with a human agent who can help."
    )
