"""`korero agent`: an agent desk in the terminal.

Offers, the customer's messages and the desk's answers print as they come;
type to reply to the current conversation, or a command:

    /accept [ID]     take the offered conversation (the latest offer by default)
    /decline [ID]    pass on it
    /pick SESSION    take any conversation over from the bot
    /back            hand the current conversation back to the bot
    /close [CODE]    close it with a disposition code (default: resolved)
    /away, /here     availability
    /quit            leave (your conversations wait out the grace period)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from korero.agent.v1 import agent_pb2 as apb
from korero.chat.v1 import chat_pb2 as pb
from korero.client._agent import AgentDesk
from korero.client._errors import ChatError

__all__ = ["register"]

_ROLES = {pb.ROLE_USER: "customer", pb.ROLE_ASSISTANT: "bot", pb.ROLE_AGENT: "agent"}


def register(subparsers: Any, target: str, terminal: Any) -> None:
    """Add `agent` to the `korero` command."""
    parser = subparsers.add_parser(
        "agent",
        help="an agent desk in the terminal: take conversations over from the bot",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", default=target, help="server HOST:PORT [%(default)s]")
    parser.add_argument("--name", required=True, help="the name customers see")
    parser.add_argument("--id", default="", help="agent id (default: from --name or the token)")
    parser.add_argument("--skills", default="", help="comma-separated queues, e.g. complaints")
    parser.add_argument(
        "--token",
        default=os.environ.get("KORERO_TOKEN", ""),
        help="API key or JWT with the agent scope [$KORERO_TOKEN]",
    )
    parser.set_defaults(func=lambda a: asyncio.run(_desk(a, terminal())))


def _packet(packet: apb.ContextPacket) -> list[str]:
    customer = packet.customer
    who = " · ".join(x for x in (customer.customer_name, customer.booking_reference) if x)
    trigger = pb.HandoffTrigger.Name(packet.trigger).removeprefix("HANDOFF_TRIGGER_").lower()
    lines = [
        f"  customer:  {who or '(unknown)'}   session {packet.session_id}",
        f"  why:       {trigger} — {packet.reason}",
        f"  intents:   {' → '.join(packet.intent_history) or '—'}",
    ]
    if packet.HasField("sentiment"):
        s = packet.sentiment
        lines.append(f"  sentiment: {s.score:+.2f} (trend {s.trend:+.2f} over {s.window})")
    lines.append(f"  summary:   {packet.summary}")
    if packet.citations:
        lines.append(
            "  sources:   " + "; ".join(f"{c.document_title} {c.section}" for c in packet.citations)
        )
    return lines


async def _desk(args: argparse.Namespace, terminal: Any) -> int:
    agent_id = args.id or args.name.lower().replace(" ", "-")
    auth = [("authorization", f"Bearer {args.token}")] if args.token else []
    skills = [s.strip() for s in args.skills.split(",") if s.strip()]
    desk = AgentDesk(
        args.target, agent_id=agent_id, display_name=args.name, skills=skills, metadata=auth
    )
    try:
        joined = await desk.open()
    except ChatError as error:
        print(f"korero agent: cannot open the desk at {args.target}: {error}", file=sys.stderr)
        return 1
    print(f"signed in as {joined.display_name} ({joined.agent_id}); waiting for conversations")
    state: dict[str, Any] = {"current": "", "offer": "", "names": {}}
    printer = asyncio.create_task(_print_events(desk, state))
    try:
        while (line := await terminal.readline("")) is not None:
            line = line.strip()
            if not line:
                continue
            if line in ("/quit", "/exit"):
                break
            await _command(desk, state, line)
    except ChatError as error:
        print(f"korero agent: {error}", file=sys.stderr)
        return 1
    finally:
        printer.cancel()
        await desk.close()
    return 0


async def _command(desk: AgentDesk, state: dict[str, Any], line: str) -> None:
    word, _, rest = line.partition(" ")
    rest = rest.strip()
    if word == "/accept":
        await desk.accept(rest or state["offer"])
    elif word == "/decline":
        await desk.decline(rest or state["offer"])
    elif word == "/pick":
        await desk.pick(rest)
    elif word in ("/back", "/close"):
        if not state["current"]:
            print("(no current conversation)")
            return
        await desk.release(state["current"], close=word == "/close", disposition=rest or "resolved")
    elif word in ("/away", "/here"):
        await desk.set_available(word == "/here")
    elif word.startswith("/"):
        print(f"(unknown command {word})")
    elif state["current"]:
        await desk.say(state["current"], line)
    else:
        print("(no current conversation: /accept an offer first)")


async def _print_events(desk: AgentDesk, state: dict[str, Any]) -> None:
    async for event in desk.events():
        kind = event.WhichOneof("kind")
        if kind == "offered":
            packet = event.offered.context
            state["offer"] = packet.handoff_id
            print(f"[offer {packet.handoff_id[:8]}] /accept or /decline")
            print("\n".join(_packet(packet)))
        elif kind == "assigned":
            packet = event.assigned.context
            state["current"] = packet.handoff_id
            verb = "back with you" if event.assigned.resumed else "accepted"
            print(f"[conversation {packet.handoff_id[:8]} {verb}]")
            if packet.handoff_id != state["offer"]:
                print("\n".join(_packet(packet)))
            for message in packet.transcript:
                who = message.agent_display_name or _ROLES.get(message.role, "?")
                print(f"  {who}> {message.text}")
        elif kind == "customer_message":
            m = event.customer_message
            mood = f" ({m.sentiment.score:+.2f})" if m.HasField("sentiment") else ""
            print(f"customer{mood}> {m.text}")
        elif kind == "ended":
            if event.ended.handoff_id == state["current"]:
                state["current"] = ""
            print(f"[conversation {event.ended.handoff_id[:8]} ended: {event.ended.reason}]")
        elif kind == "offer_withdrawn":
            print(
                f"[offer {event.offer_withdrawn.handoff_id[:8]} withdrawn: "
                f"{event.offer_withdrawn.reason}]"
            )
        elif kind == "queue":
            waiting = len(event.queue.conversations)
            print(f"[queue: {waiting} waiting, {event.queue.agents_available} agents available]")
        elif kind == "error":
            print(f"[refused {event.error.reason}: {event.error.message}]")
        sys.stdout.flush()
