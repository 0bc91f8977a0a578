// The Kōrero agent desk page: one `/ws/agent` socket through the Envoy sidecar.
//
// Frames are korero.agent.v1 ConnectRequest / ConnectResponse protobuf
// messages, binary, one per WebSocket message (the same messages as the gRPC
// AgentDeskService.Connect stream). The page signs in (`join`), shows offers
// and the queue, accepts, chats with the context packet in view, and hands
// the conversation back to the bot or closes it.

import { create, fromBinary, type MessageInitShape, toBinary } from "@bufbuild/protobuf";
import {
  Availability,
  ConnectRequestSchema,
  ConnectResponseSchema,
  type ContextPacket,
  type DeskEvent,
  ReleaseMode,
} from "./gen/korero/agent/v1/agent_pb.js";
import { HandoffTrigger, Role } from "./gen/korero/chat/v1/chat_pb.js";

const WS_PROTOCOL = "korero.agent.v1+proto";
const BEARER_PREFIX = "korero.bearer.";

interface DeskRecord {
  kind: string;
  handoffId?: string;
  text?: string;
  at: number;
}
declare global {
  interface Window {
    desk: { events: DeskRecord[] };
  }
}
window.desk = { events: [] };

const $ = <T extends HTMLElement>(id: string): T => document.getElementById(id) as T;
const statusLine = $<HTMLElement>("status");
const deskStatus = $<HTMLElement>("desk-status");
const offersList = $<HTMLUListElement>("offers");
const queueList = $<HTMLUListElement>("queue");
const mineList = $<HTMLUListElement>("mine");
const conversation = $<HTMLElement>("conversation");
const contextBox = $<HTMLElement>("context");
const transcript = $<HTMLElement>("transcript");
const availability = $<HTMLSelectElement>("availability");
const token = localStorage.getItem("korero.token") ?? "";

let socket: WebSocket | null = null;
/** Conversations that are mine: context and transcript lines, by handoff id. */
const mine = new Map<string, { packet: ContextPacket; lines: HTMLElement[] }>();
const offers = new Map<string, ContextPacket>();
let current = "";

function send(kind: MessageInitShape<typeof ConnectRequestSchema>["kind"]): void {
  if (!socket) return;
  socket.send(toBinary(ConnectRequestSchema, create(ConnectRequestSchema, { kind })));
}

function trigger(t: HandoffTrigger): string {
  return (HandoffTrigger[t] ?? "").replace(/_/g, " ").toLowerCase();
}

function signed(n: number): string {
  return `${n >= 0 ? "+" : ""}${n.toFixed(2)}`;
}

function line(role: "user" | "assistant" | "agent", text: string, who = ""): HTMLElement {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  if (who) {
    const w = document.createElement("div");
    w.className = "who";
    w.textContent = who;
    div.append(w);
  }
  div.append(document.createTextNode(text));
  return div;
}

function showContext(packet: ContextPacket): void {
  const rows: [string, string][] = [
    ["Customer", [packet.customer?.customerName, packet.customer?.bookingReference].filter(Boolean).join(" · ") || "(unknown)"],
    ["Why", `${trigger(packet.trigger)}: ${packet.reason}`],
    ["Queue", packet.queue],
    ["Intents", packet.intentHistory.join(" → ") || "—"],
    ["Sentiment", packet.sentiment ? `${signed(packet.sentiment.score)} (trend ${signed(packet.sentiment.trend)} over ${packet.sentiment.window})` : "—"],
    ["Summary", packet.summary],
    ["Sources used", packet.citations.map((c) => `${c.documentTitle} ${c.section}`).join("; ") || "—"],
  ];
  const dl = document.createElement("dl");
  for (const [k, v] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v;
    dd.dataset.field = k.toLowerCase();
    dl.append(dt, dd);
  }
  contextBox.replaceChildren(dl);
}

function select(handoffId: string): void {
  const conv = mine.get(handoffId);
  if (!conv) return;
  current = handoffId;
  conversation.hidden = false;
  showContext(conv.packet);
  transcript.replaceChildren(...conv.lines);
  transcript.lastElementChild?.scrollIntoView({ block: "end" });
  for (const li of mineList.children) (li as HTMLElement).classList.toggle("selected", (li as HTMLElement).dataset.handoff === handoffId);
  $<HTMLInputElement>("reply-input").focus();
}

function renderMine(): void {
  mineList.replaceChildren(
    ...[...mine.entries()].map(([id, conv]) => {
      const li = document.createElement("li");
      li.dataset.handoff = id;
      li.textContent = `${conv.packet.customer?.customerName || "Customer"} — ${trigger(conv.packet.trigger)}`;
      li.addEventListener("click", () => select(id));
      return li;
    }),
  );
  if (current) select(current);
}

function addLine(handoffId: string, el: HTMLElement): void {
  const conv = mine.get(handoffId);
  if (!conv) return;
  conv.lines.push(el);
  if (handoffId === current) {
    transcript.append(el);
    el.scrollIntoView({ block: "end" });
  }
}

function renderOffers(): void {
  offersList.replaceChildren(
    ...[...offers.entries()].map(([id, packet]) => {
      const li = document.createElement("li");
      li.className = "offer";
      li.dataset.handoff = id;
      li.append(`${packet.customer?.customerName || "Customer"}: ${trigger(packet.trigger)} — ${packet.reason}`);
      const accept = document.createElement("button");
      accept.textContent = "Accept";
      accept.className = "accept";
      accept.addEventListener("click", () => send({ case: "accept", value: { handoffId: id } }));
      const decline = document.createElement("button");
      decline.textContent = "Decline";
      decline.addEventListener("click", () => send({ case: "decline", value: { handoffId: id } }));
      li.append(document.createElement("br"), accept, decline);
      return li;
    }),
  );
}

function onEvent(event: DeskEvent): void {
  const kind = event.kind;
  const record: DeskRecord = { kind: kind.case ?? "none", at: performance.now() };
  window.desk.events.push(record);
  switch (kind.case) {
    case "joined":
      document.body.dataset.desk = "joined";
      deskStatus.textContent = `signed in as ${kind.value.displayName}`;
      availability.disabled = false;
      statusLine.textContent = "waiting for conversations";
      break;
    case "queue": {
      const q = kind.value;
      $<HTMLElement>("queue-count").textContent = `(${q.conversations.length} waiting, ${q.agentsAvailable} agents)`;
      queueList.replaceChildren(
        ...q.conversations.map((c) => {
          const li = document.createElement("li");
          li.textContent = `#${c.position} ${c.customerName || c.sessionId.slice(0, 8)} — ${trigger(c.trigger)} (${c.queue})${c.offeredTo ? ` · offered to ${c.offeredTo}` : ""}`;
          const pick = document.createElement("button");
          pick.textContent = "Pick";
          pick.addEventListener("click", () => send({ case: "pick", value: { sessionId: c.sessionId, reason: "" } }));
          li.append(document.createElement("br"), pick);
          return li;
        }),
      );
      break;
    }
    case "offered": {
      const packet = kind.value.context;
      if (packet) {
        record.handoffId = packet.handoffId;
        offers.set(packet.handoffId, packet);
        renderOffers();
        statusLine.textContent = "a conversation is offered to you";
      }
      break;
    }
    case "offerWithdrawn":
      offers.delete(kind.value.handoffId);
      renderOffers();
      break;
    case "assigned": {
      const packet = kind.value.context;
      if (!packet) break;
      record.handoffId = packet.handoffId;
      offers.delete(packet.handoffId);
      renderOffers();
      const lines = packet.transcript.map((m) =>
        m.role === Role.USER
          ? line("user", m.text, "Customer")
          : m.role === Role.AGENT
            ? line("agent", m.text, m.agentDisplayName)
            : line("assistant", m.text, "Bot"),
      );
      mine.set(packet.handoffId, { packet, lines });
      current = packet.handoffId;
      renderMine();
      statusLine.textContent = kind.value.resumed ? "conversation given back to you" : "you are talking to the customer";
      break;
    }
    case "customerMessage": {
      const m = kind.value;
      record.handoffId = m.handoffId;
      record.text = m.text;
      const score = m.sentiment ? ` (${signed(m.sentiment.score)})` : "";
      addLine(m.handoffId, line("user", m.text, `Customer${score}`));
      break;
    }
    case "messageSent":
      record.handoffId = kind.value.handoffId;
      break;
    case "ended": {
      record.handoffId = kind.value.handoffId;
      mine.delete(kind.value.handoffId);
      if (current === kind.value.handoffId) {
        current = "";
        conversation.hidden = true;
      }
      renderMine();
      statusLine.textContent = `conversation ended: ${kind.value.reason}`;
      break;
    }
    case "error":
      record.text = `${kind.value.reason}: ${kind.value.message}`;
      statusLine.textContent = `refused: ${kind.value.reason} — ${kind.value.message}`;
      break;
    default:
      break;
  }
}

$<HTMLFormElement>("join").addEventListener("submit", (e) => {
  e.preventDefault();
  if (socket) return;
  const name = $<HTMLInputElement>("agent-name").value.trim();
  const skills = $<HTMLInputElement>("agent-skills").value.split(",").map((s) => s.trim()).filter(Boolean);
  const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
  const protocols = [WS_PROTOCOL];
  if (token) protocols.push(BEARER_PREFIX + btoa(token).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, ""));
  const ws = new WebSocket(`${scheme}//${window.location.host}/ws/agent`, protocols);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => {
    socket = ws;
    const agentId = localStorage.getItem("korero.agent") ?? `agent-${name.toLowerCase().replace(/\W+/g, "-")}`;
    send({ case: "join", value: { agentId, displayName: name, skills, maxConversations: 3, availability: Availability.AVAILABLE } });
    $<HTMLButtonElement>("join-button").disabled = true;
  };
  ws.onmessage = (msg: MessageEvent<ArrayBuffer>) => {
    const event = fromBinary(ConnectResponseSchema, new Uint8Array(msg.data)).event;
    if (event) onEvent(event);
  };
  ws.onclose = (e: CloseEvent) => {
    socket = null;
    document.body.dataset.desk = "signed-out";
    deskStatus.textContent = `disconnected (${e.code} ${e.reason})`;
    $<HTMLButtonElement>("join-button").disabled = false;
  };
});

availability.addEventListener("change", () =>
  send({
    case: "availability",
    value: { availability: availability.value === "away" ? Availability.AWAY : Availability.AVAILABLE, skills: [] },
  }),
);

$<HTMLFormElement>("reply").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = $<HTMLInputElement>("reply-input");
  const text = input.value.trim();
  if (!text || !current) return;
  input.value = "";
  const name = $<HTMLInputElement>("agent-name").value.trim();
  send({ case: "message", value: { handoffId: current, messageId: crypto.randomUUID(), text } });
  addLine(current, line("agent", text, name));
});

function release(mode: ReleaseMode): void {
  if (!current) return;
  const disposition = $<HTMLInputElement>("disposition").value.trim() || (mode === ReleaseMode.CLOSE ? "resolved" : "");
  send({ case: "release", value: { handoffId: current, mode, disposition, note: "" } });
}
$<HTMLButtonElement>("hand-back").addEventListener("click", () => release(ReleaseMode.RETURN_TO_BOT));
$<HTMLButtonElement>("close").addEventListener("click", () => release(ReleaseMode.CLOSE));
$<HTMLInputElement>("agent-name").focus();
