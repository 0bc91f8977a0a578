// The live operations page: polls /ops/stats (the WebSocket listener, through
// Envoy) with the admin token and shows streams, turns/s, time to first token,
// cache hit rate, limits hit and upstream errors. The token stays in this
// browser (localStorage "korero.opsToken") and goes only in the Authorization
// header of that one request.

export {}; // a module, so `declare global` below applies

/** The body of GET /ops/stats (server/korero/server/ops.py). */
interface OpsStats {
  window_seconds: number;
  active_streams: number;
  turns_per_second: number | null;
  ttft_seconds: { p50: number | null; p95: number | null };
  cache_hit_rate: number | null;
  limits_hit: Record<string, number>;
  upstream_errors: Record<string, number>;
  redis_errors: number;
}

declare global {
  interface Window {
    koreroOps: { updates: number; refusals: number; last: OpsStats | null };
  }
}

const TOKEN_KEY = "korero.opsToken";
const every = Number(new URLSearchParams(location.search).get("every") ?? "3000");
window.koreroOps = { updates: 0, refusals: 0, last: null };

const $ = <T extends HTMLElement>(selector: string): T => {
  const found = document.querySelector<T>(selector);
  if (!found) throw new Error(`missing ${selector}`);
  return found;
};

function tile(stat: string, value: string, detail = "", alert = false): void {
  const section = $(`.tile[data-stat="${stat}"]`);
  section.querySelector(".value")!.textContent = value;
  const note = section.querySelector(".detail");
  if (note) note.textContent = detail;
  section.dataset.alert = String(alert);
}

const ms = (seconds: number | null): string =>
  seconds === null ? "–" : `${(seconds * 1000).toFixed(seconds < 0.1 ? 1 : 0)} ms`;

const total = (counts: Record<string, number>): number =>
  Object.values(counts).reduce((a, b) => a + b, 0);

const breakdown = (counts: Record<string, number>): string =>
  Object.entries(counts)
    .map(([name, n]) => `${name} ${n}`)
    .join(", ");

function render(stats: OpsStats): void {
  tile("active_streams", String(stats.active_streams));
  tile(
    "turns_per_second",
    stats.turns_per_second === null ? "–" : stats.turns_per_second.toFixed(2),
  );
  tile("ttft_p50", ms(stats.ttft_seconds.p50));
  tile("ttft_p95", ms(stats.ttft_seconds.p95));
  tile(
    "cache_hit_rate",
    stats.cache_hit_rate === null ? "–" : `${Math.round(stats.cache_hit_rate * 100)} %`,
  );
  const limits = total(stats.limits_hit);
  tile("limits_hit", String(limits), breakdown(stats.limits_hit), limits > 0);
  const upstream = total(stats.upstream_errors);
  tile("upstream_errors", String(upstream), breakdown(stats.upstream_errors), upstream > 0);
  tile("redis_errors", String(stats.redis_errors), "", stats.redis_errors > 0);
  $("#window").textContent = stats.window_seconds.toFixed(0);
  $("#updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

let timer: number | undefined;

async function poll(): Promise<void> {
  const token = localStorage.getItem(TOKEN_KEY);
  if (!token) return;
  try {
    const response = await fetch("/ops/stats", {
      headers: { Authorization: `Bearer ${token}` },
      cache: "no-store",
    });
    if (response.status === 401) {
      window.koreroOps.refusals += 1;
      localStorage.removeItem(TOKEN_KEY);
      document.body.dataset.state = "token";
      $("#token-error").textContent = "that token was refused";
      $("#updated").textContent = "not connected";
      return;
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const stats = (await response.json()) as OpsStats;
    window.koreroOps.last = stats;
    window.koreroOps.updates += 1;
    document.body.dataset.state = "live";
    render(stats);
  } catch (error) {
    $("#updated").textContent = `no answer (${String(error)}); retrying`;
  }
  timer = window.setTimeout(poll, every);
}

$("#token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem(TOKEN_KEY, $<HTMLInputElement>("#token").value.trim());
  $("#token-error").textContent = "";
  window.clearTimeout(timer);
  void poll();
});

void poll();
