// The Kōrero chat page: one session, two routes through the Envoy sidecar.
//
// gRPC-Web: each turn is one server-streaming SendMessage call (browsers cannot
// stream requests over gRPC-Web); cancelling aborts the call, which cancels the
// turn and the upstream LLM request on the server.
// WebSocket: one socket carries the session (`/ws/chat`); frames are the same
// ChatRequest / ChatResponse protobuf messages as the gRPC Chat stream, binary,
// one message per WebSocket message; cancelling sends a `cancel` frame.
// Switching routes keeps the session: the WebSocket resumes it with `start`.
// Human handoff: "Talk to a person" (or a turn that escalates) moves the page to
// the WebSocket route, where handoff events and the agent's messages arrive
// between turns; while an agent owns the conversation, messages go to them.
// Both routes reconnect after a broken connection with the last seq seen as the
// resume cursor (`after_seq`): the answer goes on where it stopped, no event is
// shown twice, and a message the server never got is sent again with the same
// client_message_id (bounded attempts, exponential backoff with jitter).

import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import {
  ChatRequestSchema,
  ChatResponseSchema,
  ChatService,
  type Event,
  FinishReason,
  ToolCallStatus,
} from "./gen/korero/chat/v1/chat_pb.js";
import { renderMarkdown } from "./markdown.js";

type RouteName = "grpc-web" | "websocket";

/** What the page saw, for people (the DOM) and for the browser tests (window.korero). */
interface EventRecord {
  route: RouteName;
  kind: string;
  seq: string;
  turnId: string;
  text?: string;
  at: number;
}

declare global {
  interface Window {
    korero: { events: EventRecord[]; closes: { code: number; reason: string }[] };
  }
}
window.korero = { events: [], closes: [] };

const WS_PROTOCOL = "korero.chat.v1+proto";
const BEARER_PREFIX = "korero.bearer.";

const $ = <T extends HTMLElement>(id: string): T => document.getElementById(id) as T;
const log = $<HTMLElement>("log");
const input = $<HTMLInputElement>("input");
const sendButton = $<HTMLButtonElement>("send");
const cancelButton = $<HTMLButtonElement>("cancel");
const routeSelect = $<HTMLSelectElement>("route");
const statusLine = $<HTMLElement>("status");
const sessionLabel = $<HTMLElement>("session");
const handoffButton = $<HTMLButtonElement>("handoff");

// An optional token (localStorage "korero.token") goes to the same Authenticator
// on both routes: as the authorization header, or as a WebSocket subprotocol.
const token = localStorage.getItem("korero.token") ?? "";

let sessionId = "";

function setStatus(text: string): void {
  statusLine.textContent = text;
}

function newId(): string {
  return crypto.randomUUID();
}

function durationSeconds(d: { seconds: bigint; nanos: number } | undefined): number {
  return d ? Number(d.seconds) + d.nanos / 1e9 : 0;
}

/** A handoff event or an agent message outside any turn: a notice or an agent bubble. */
function showSessionEvent(route: RouteName, event: Event): void {
  const kind = event.kind;
  const record: EventRecord = { route, kind: kind.case ?? "none", seq: event.seq.toString(), turnId: event.turnId, at: performance.now() };
  window.korero.events.push(record);
  let text = "";
  switch (kind.case) {
    case "handoffRequested":
      text = kind.value.message || "Connecting you with a member of our team…";
      document.body.dataset.handoff = "requested";
      break;
    case "handoffQueued": {
      const wait = Math.max(1, Math.round(durationSeconds(kind.value.estimatedWait) / 60));
      text = `You're number ${kind.value.position} in the queue (about ${wait} min).`;
      document.body.dataset.handoff = "queued";
      break;
    }
    case "agentJoined":
      text = `${kind.value.agentDisplayName} joined the chat.`;
      document.body.dataset.handoff = "agent";
      break;
    case "agentMessage": {
      record.text = kind.value.text;
      const bubble = document.createElement("div");
      bubble.className = "msg agent";
      const who = document.createElement("div");
      who.className = "who";
      who.textContent = kind.value.agentDisplayName;
      bubble.append(who, document.createTextNode(kind.value.text));
      log.append(bubble);
      bubble.scrollIntoView({ block: "end" });
      return;
    }
    case "agentLeft":
      text = kind.value.reason === "disconnected"
        ? `${kind.value.agentDisplayName} lost their connection; please hold on.`
        : `${kind.value.agentDisplayName} left the chat.`;
      break;
    case "handoffEnded":
      text = kind.value.message || "The conversation with our team has ended.";
      document.body.dataset.handoff = "ended";
      break;
    default:
      return;
  }
  record.text = text;
  const notice = document.createElement("div");
  notice.className = "msg notice";
  notice.textContent = text;
  log.append(notice);
  notice.scrollIntoView({ block: "end" });
}

const SESSION_KINDS = new Set(["handoffRequested", "handoffQueued", "agentJoined", "agentMessage", "agentLeft", "handoffEnded"]);

/** The last seq of the session's log this page has shown: the resume cursor. */
let lastSeq = 0n;

const RECONNECT_ATTEMPTS = 6;

/** Exponential backoff with full jitter: up to 0.1 s × 2^attempt, at most 3 s. */
function backoff(attempt: number): Promise<void> {
  const ceiling = Math.min(3000, 100 * 2 ** attempt);
  return new Promise((resolve) => setTimeout(resolve, Math.random() * ceiling));
}

/** An event already shown before the connection broke (seq only goes up). */
function seen(event: Event): boolean {
  if (event.turnId === "") return false;
  if (event.seq <= lastSeq) return true;
  lastSeq = event.seq;
  return false;
}

let answerCount = 0;

/** One assistant bubble: text (rendered Markdown), sources, and the line with usage and finish. */
class AnswerView {
  private readonly text: HTMLElement;
  private readonly citations: HTMLOListElement;
  private readonly tools: HTMLUListElement;
  private readonly toolItems = new Map<string, HTMLLIElement>();
  private readonly meta: HTMLElement;
  private readonly bubble: HTMLElement;
  /** The turn handed the conversation to a person. */
  escalated = false;
  private ttftShown = false;
  private readonly startedAt = performance.now();
  private readonly prefix = `a${++answerCount}`;
  private raw = "";
  /** Sources-list entries by citation label (`Baggage Policy, Section 2.1`). */
  private readonly sources = new Map<string, { id: string; n: number; item: HTMLLIElement }>();

  constructor(question: string) {
    const user = document.createElement("div");
    user.className = "msg user";
    user.textContent = question;
    const bubble = document.createElement("div");
    this.bubble = bubble;
    bubble.className = "msg assistant";
    this.text = document.createElement("div");
    this.text.className = "text";
    this.citations = document.createElement("ol");
    this.citations.className = "citations";
    this.tools = document.createElement("ul");
    this.tools.className = "tools";
    this.meta = document.createElement("div");
    this.meta.className = "meta";
    this.meta.textContent = "…";
    bubble.append(this.tools, this.text, this.citations, this.meta);
    log.append(user, bubble);
    bubble.scrollIntoView({ block: "end" });
  }

  /** The sources-list entry of `label`, created (with the label as its text) if new. */
  private source(label: string): { id: string; n: number; item: HTMLLIElement } {
    let entry = this.sources.get(label);
    if (!entry) {
      const n = this.sources.size + 1;
      const item = document.createElement("li");
      item.id = `${this.prefix}-src-${n}`;
      item.textContent = label;
      entry = { id: item.id, n, item };
      this.sources.set(label, entry);
      this.citations.append(item);
    }
    return entry;
  }

  private render(): void {
    this.text.innerHTML = renderMarkdown(this.raw, (label) => this.source(label));
  }

  /** Show one event; true when it ends the turn. */
  show(route: RouteName, event: Event): boolean {
    const kind = event.kind;
    const record: EventRecord = {
      route,
      kind: kind.case ?? "none",
      seq: event.seq.toString(),
      turnId: event.turnId,
      at: performance.now(),
    };
    window.korero.events.push(record);
    switch (kind.case) {
      case "sessionStarted":
        sessionId = event.sessionId;
        sessionLabel.textContent = `session ${sessionId}`;
        return false;
      case "turnStarted":
        this.meta.textContent = kind.value.replayed ? "replaying…" : "thinking…";
        return false;
      case "textDelta":
        record.text = kind.value.text;
        this.raw += kind.value.text;
        this.render();
        if (!this.ttftShown) {
          this.ttftShown = true;
          this.meta.textContent = `first token after ${Math.round(performance.now() - this.startedAt)} ms…`;
        }
        this.text.parentElement?.scrollIntoView({ block: "end" });
        return false;
      case "toolCallStarted": {
        const call = kind.value;
        const item = document.createElement("li");
        item.dataset.status = "running";
        item.textContent = `Looking up ${call.source || call.name}${call.arguments ? ` ${call.arguments}` : ""}…`;
        this.toolItems.set(call.callId, item);
        this.tools.append(item);
        return false;
      }
      case "toolCallFinished": {
        const f = kind.value;
        const item = this.toolItems.get(f.callId) ?? this.tools.appendChild(document.createElement("li"));
        const ms = f.duration ? Math.round(Number(f.duration.seconds) * 1000 + f.duration.nanos / 1e6) : 0;
        const ok = f.status === ToolCallStatus.OK;
        item.dataset.status = ok ? "ok" : "failed";
        const status = (ToolCallStatus[f.status] ?? String(f.status)).toLowerCase().replace(/_/g, " ");
        item.textContent = ok
          ? `${f.name}: ${f.source || "done"} (${ms} ms)`
          : `${f.name}: ${status}${f.error ? ` — ${f.error}` : ""} (${ms} ms)`;
        if (ok && f.source) this.source(f.source);
        return false;
      }
      case "citation": {
        const c = kind.value;
        const label = c.documentId.startsWith("tool:")
          ? `${c.documentTitle}, ${c.section}`
          : c.section
            ? `${c.documentTitle}, Section ${c.section}`
            : c.documentTitle;
        const entry = this.source(label);
        entry.item.textContent = `${label}: ${c.snippet}`;
        return false;
      }
      case "usage":
        this.meta.textContent = `tokens: ${kind.value.inputTokens} in, ${kind.value.outputTokens} out${kind.value.estimated ? " (estimated)" : ""}`;
        return false;
      case "rateLimit":
        setStatus(`rate limit: ${kind.value.remainingRequests} requests left (${kind.value.limit})`);
        return false;
      case "heartbeat":
        return false;
      case "handoffRequested":
        this.escalated = true;
        document.body.dataset.handoff = "requested";
        return false;
      case "messageRelayed":
        // A person owns the conversation: the message went to them, the bot stays silent.
        this.bubble.remove();
        this.meta.dataset.terminal = "relayed";
        return true;
      case "done": {
        const d = kind.value;
        const finish = FinishReason[d.finishReason].toLowerCase().replace("finish_reason_", "");
        const usage = d.usage;
        const ttft = d.timings?.timeToFirstToken;
        const ttftMs = ttft ? Math.round(Number(ttft.seconds) * 1000 + ttft.nanos / 1e6) : undefined;
        this.meta.textContent =
          `${finish === "cancelled" ? "cancelled" : `done (${finish})`}` +
          (usage ? ` · tokens: ${usage.inputTokens} in, ${usage.outputTokens} out${usage.estimated ? " (estimated)" : ""}` : "") +
          (ttftMs !== undefined ? ` · first token ${ttftMs} ms` : "") +
          (d.cached ? " · cached" : "");
        this.meta.dataset.terminal = finish;
        return true;
      }
      case "error": {
        const e = kind.value;
        this.markError(`error ${Code[e.code] ?? e.code} ${e.reason}: ${e.message}${e.retryable ? " (retryable)" : ""}`);
        return event.turnId !== "" || !sessionId;
      }
      default:
        return false;
    }
  }

  markCancelled(): void {
    this.meta.textContent = "cancelled";
    this.meta.dataset.terminal = "cancelled";
  }

  markError(text: string): void {
    this.meta.textContent = text;
    this.meta.className = "meta error";
    this.meta.dataset.terminal = "error";
  }
}

interface Route {
  readonly name: RouteName;
  /** Run one turn; resolves once it ended (terminal event, cancel or failure). */
  send(text: string, view: AnswerView): Promise<void>;
  cancel(): void;
  close(): void;
}

class GrpcWebRoute implements Route {
  readonly name = "grpc-web" as const;
  private readonly client;
  private abort: AbortController | null = null;

  constructor() {
    const auth: Interceptor = (next) => async (req) => {
      if (token) req.header.set("authorization", `Bearer ${token}`);
      return await next(req);
    };
    const transport = createGrpcWebTransport({
      baseUrl: window.location.origin, // Envoy serves the page and the API: one origin
      interceptors: [auth],
    });
    this.client = createClient(ChatService, transport);
  }

  async send(text: string, view: AnswerView): Promise<void> {
    const clientMessageId = newId();
    let cursor: bigint | undefined;
    for (let attempt = 0; ; attempt++) {
      this.abort = new AbortController();
      try {
        const stream = this.client.sendMessage(
          { sessionId, message: { clientMessageId, text }, afterSeq: cursor },
          { signal: this.abort.signal },
        );
        for await (const response of stream) {
          const event = response.event;
          if (!event || seen(event)) continue;
          if (view.show(this.name, event)) return;
        }
        return;
      } catch (err) {
        const error = ConnectError.from(err);
        if (error.code === Code.Canceled) {
          view.markCancelled();
          return;
        }
        const broken = error.code === Code.Unavailable || error.code === Code.Unknown;
        if (!broken || !sessionId || attempt + 1 >= RECONNECT_ATTEMPTS) {
          view.markError(`error ${Code[error.code]}: ${error.rawMessage}`);
          return;
        }
        // The call broke off: send the same message again with the cursor, and the
        // server sends the rest of the same turn (or runs it, if it never arrived).
        cursor = lastSeq;
        setStatus(`connection lost; resuming from seq ${lastSeq}…`);
        await backoff(attempt);
      } finally {
        this.abort = null;
      }
    }
  }

  cancel(): void {
    this.abort?.abort();
  }

  close(): void {
    this.cancel();
  }
}

class WebSocketRoute implements Route {
  readonly name = "websocket" as const;
  private socket: WebSocket | null = null;
  private opening: Promise<WebSocket> | null = null;
  private view: AnswerView | null = null;
  private turnId = "";
  private settle: (() => void) | null = null;
  /** The message whose turn is being shown, and whether its turn_started came. */
  private pending: { clientMessageId: string; text: string; started: boolean } | null = null;
  private closing = false;

  private connect(): Promise<WebSocket> {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) return Promise.resolve(this.socket);
    if (this.opening) return this.opening;
    this.opening = new Promise<WebSocket>((resolve, reject) => {
      const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
      const protocols = [WS_PROTOCOL];
      if (token) protocols.push(BEARER_PREFIX + btoa(token).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, ""));
      const ws = new WebSocket(`${scheme}//${window.location.host}/ws/chat`, protocols);
      ws.binaryType = "arraybuffer";
      let started = false;
      // A session this page already shows events of resumes from its cursor.
      const afterSeq = sessionId && this.pending ? lastSeq : undefined;
      let replayThrough: bigint | null = null;
      ws.onopen = () => {
        const start = create(ChatRequestSchema, {
          kind: { case: "start", value: { sessionId, afterSeq } },
        });
        ws.send(toBinary(ChatRequestSchema, start));
      };
      ws.onmessage = (msg: MessageEvent<ArrayBuffer>) => {
        const event = fromBinary(ChatResponseSchema, new Uint8Array(msg.data)).event;
        if (!event) return;
        if (!started && event.kind.case === "sessionStarted") {
          started = true;
          window.korero.events.push({ route: this.name, kind: "sessionStarted", seq: event.seq.toString(), turnId: "", at: performance.now() });
          sessionId = event.sessionId;
          sessionLabel.textContent = `session ${sessionId}`;
          this.socket = ws;
          const replay = event.kind.value.replay;
          if (replay) {
            replayThrough = replay.throughSeq;
            if (replayThrough <= lastSeq) this.resendIfLost(ws);
          }
          resolve(ws);
          return;
        }
        if (!event.turnId && SESSION_KINDS.has(event.kind.case ?? "")) {
          if (event.seq <= lastSeq) return; // shown before the connection broke
          lastSeq = event.seq;
          showSessionEvent(this.name, event);
          return;
        }
        if (event.kind.case === "messageRelayed" && this.pending
            && event.kind.value.clientMessageId === this.pending.clientMessageId) {
          this.pending.started = true; // it reached the agent: never send it again
        }
        if (seen(event)) return;
        if (event.kind.case === "turnStarted") {
          this.turnId = event.turnId;
          if (this.pending && event.kind.value.clientMessageId === this.pending.clientMessageId) {
            this.pending.started = true;
          }
        }
        if (replayThrough !== null && event.seq >= replayThrough) {
          replayThrough = null;
          this.resendIfLost(ws);
        }
        if (this.view && this.view.show(this.name, event)) this.finish();
      };
      ws.onclose = (e: CloseEvent) => {
        window.korero.closes.push({ code: e.code, reason: e.reason });
        setStatus(`WebSocket closed: ${e.code} ${e.reason}`);
        this.socket = null;
        this.opening = null;
        if (!started) reject(new Error(`closed ${e.code} ${e.reason}`));
        // A broken connection (not ours, not a refusal) mid-turn: resume from the cursor.
        const broken = !this.closing && e.code !== 1000 && e.code !== 1008 && e.code < 4000;
        if (started && broken && this.view && this.pending) {
          void this.resume();
          return;
        }
        this.view?.markError(`connection closed: ${e.code} ${e.reason}`);
        this.finish();
      };
    });
    const opening = this.opening;
    opening.finally(() => {
      if (this.opening === opening) this.opening = null;
    }).catch(() => undefined);
    return opening;
  }

  /** After a replay: a message whose turn never started is sent again (same id). */
  private resendIfLost(ws: WebSocket): void {
    const pending = this.pending;
    if (!pending || pending.started) return;
    const message = create(ChatRequestSchema, {
      kind: { case: "message", value: { clientMessageId: pending.clientMessageId, text: pending.text } },
    });
    ws.send(toBinary(ChatRequestSchema, message));
  }

  private async resume(): Promise<void> {
    for (let attempt = 0; attempt < RECONNECT_ATTEMPTS; attempt++) {
      setStatus(`connection lost; resuming from seq ${lastSeq}…`);
      await backoff(attempt);
      try {
        await this.connect();
        return; // the replay, then the live turn, arrive through onmessage
      } catch {
        // try again
      }
    }
    this.view?.markError("connection lost; could not resume");
    this.finish();
  }

  private finish(): void {
    this.view = null;
    this.pending = null;
    this.turnId = "";
    const settle = this.settle;
    this.settle = null;
    settle?.();
  }

  async send(text: string, view: AnswerView): Promise<void> {
    let ws: WebSocket;
    try {
      ws = await this.connect();
    } catch (err) {
      view.markError(String(err));
      return;
    }
    this.view = view;
    const done = new Promise<void>((resolve) => (this.settle = resolve));
    const clientMessageId = newId();
    this.pending = { clientMessageId, text, started: false };
    const message = create(ChatRequestSchema, {
      kind: { case: "message", value: { clientMessageId, text } },
    });
    ws.send(toBinary(ChatRequestSchema, message));
    await done;
  }

  cancel(): void {
    if (!this.socket) return;
    const cancel = create(ChatRequestSchema, { kind: { case: "cancel", value: { turnId: this.turnId } } });
    this.socket.send(toBinary(ChatRequestSchema, cancel));
  }

  /** Ask for a person (the `handoff` frame); what follows arrives between turns. */
  async requestHandoff(): Promise<void> {
    const ws = await this.connect();
    const ask = create(ChatRequestSchema, { kind: { case: "handoff", value: { reason: "" } } });
    ws.send(toBinary(ChatRequestSchema, ask));
  }

  /** Open the socket now, to hear handoff events before the next message. */
  async listen(): Promise<void> {
    await this.connect();
  }

  close(): void {
    this.closing = true;
    this.socket?.close(1000, "route switched");
    this.socket = null;
  }
}

let route: Route = new GrpcWebRoute();

function switchRoute(name: RouteName): void {
  route.close();
  routeSelect.value = name;
  route = name === "websocket" ? new WebSocketRoute() : new GrpcWebRoute();
  document.body.dataset.route = name;
  setStatus(`route: ${name}`);
}

routeSelect.addEventListener("change", () => switchRoute(routeSelect.value as RouteName));

/** Handoff events need the full-duplex route: move there (the session is kept). */
async function followHandoff(): Promise<WebSocketRoute> {
  if (!(route instanceof WebSocketRoute)) switchRoute("websocket");
  const ws = route as WebSocketRoute;
  await ws.listen();
  return ws;
}

handoffButton.addEventListener("click", () => {
  void followHandoff().then((ws) => ws.requestHandoff()).catch((err) => setStatus(`handoff failed: ${err}`));
});

$<HTMLFormElement>("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = input.value.trim();
  if (!text || document.body.dataset.turn === "streaming") return;
  input.value = "";
  const view = new AnswerView(text);
  document.body.dataset.turn = "streaming";
  sendButton.disabled = true;
  cancelButton.disabled = false;
  routeSelect.disabled = true;
  setStatus(`answering via ${route.name}…`);
  void route.send(text, view).finally(() => {
    if (view.escalated && route.name === "grpc-web") void followHandoff().catch(() => undefined);
    document.body.dataset.turn = "idle";
    sendButton.disabled = false;
    cancelButton.disabled = true;
    routeSelect.disabled = false;
    setStatus(`ready (${route.name})`);
    input.focus();
  });
});

cancelButton.addEventListener("click", () => route.cancel());
input.focus();
