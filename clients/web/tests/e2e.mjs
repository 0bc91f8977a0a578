// The chat page in real Chromium, through Envoy, on both routes.
//
// Run by tests/browser/test_browser.py (so `make test` runs it), which starts
// Redis, the simulated upstream, Kōrero and Envoy and passes:
//   KORERO_PAGE_URL  the page through Envoy, e.g. http://127.0.0.1:18080/
//   KORERO_SIM_URL   the simulated upstream's root (faults, recorded requests)
//   KORERO_ARTIFACTS where screenshots go
//   CHROMIUM         the browser binary (default /usr/lib/chromium/chromium)
// Prints one `E2E {json}` line with what it saw, then `N passed, N failed`.

import assert from "node:assert/strict";
import { mkdtempSync, rmSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const PAGE = process.env.KORERO_PAGE_URL;
const SIM = process.env.KORERO_SIM_URL;
const ARTIFACTS = process.env.KORERO_ARTIFACTS ?? "artifacts";
const CHROMIUM = process.env.CHROMIUM ?? "/usr/lib/chromium/chromium";
assert.ok(PAGE && SIM, "KORERO_PAGE_URL and KORERO_SIM_URL are required");

const TURN_TIMEOUT = 15_000;

async function simRequests() {
  const response = await fetch(new URL("/_sim/requests", SIM));
  assert.equal(response.status, 200);
  const body = await response.json();
  return Array.isArray(body) ? body : body.requests;
}

async function injectStall(afterTokens) {
  const response = await fetch(new URL("/_sim/faults", SIM), {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify([{ kind: "stall", after_tokens: afterTokens }]),
  });
  assert.ok(response.ok, `sim refused the fault: ${response.status}`);
}

async function until(what, predicate, timeoutMs = 5_000) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const value = await predicate();
    if (value) return value;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Type a question, send it, return the locator of its answer bubble. */
async function ask(page, text) {
  await page.fill("#input", text);
  await page.click("#send");
  return page.locator(".msg.assistant").last();
}

/** The events the page recorded for the latest turn of `route`. */
async function lastTurn(page, route) {
  const events = await page.evaluate(() => window.korero.events);
  const ofRoute = events.filter((e) => e.route === route && e.turnId);
  const turnId = ofRoute.at(-1).turnId;
  return ofRoute.filter((e) => e.turnId === turnId);
}

async function answeredTurn(page, route, question) {
  const bubble = await ask(page, question);
  await bubble.locator(".meta[data-terminal]").waitFor({ timeout: TURN_TIMEOUT });
  assert.equal(await bubble.locator(".meta").getAttribute("data-terminal"), "stop");
  const events = await lastTurn(page, route);
  const kinds = events.map((e) => e.kind);
  assert.equal(kinds[0], "turnStarted", `${route}: ${kinds}`);
  assert.deepEqual(kinds.slice(-2), ["usage", "done"], `${route}: ${kinds}`);
  const deltas = events.filter((e) => e.kind === "textDelta");
  assert.ok(deltas.length >= 2, `${route}: only ${deltas.length} text deltas`);
  const seqs = events.map((e) => BigInt(e.seq));
  for (let i = 1; i < seqs.length; i++) {
    assert.ok(seqs[i] > seqs[i - 1], `${route}: seq not increasing: ${seqs}`);
  }
  // Streamed, not buffered by a proxy: the deltas arrived spread over time.
  const spreadMs = deltas.at(-1).at - deltas[0].at;
  assert.ok(spreadMs > 100, `${route}: deltas arrived within ${spreadMs} ms`);
  const text = deltas.map((e) => e.text).join("");
  assert.equal(await bubble.locator(".text").textContent(), text);
  assert.ok(text.startsWith(`You asked: "${question}"`), `${route}: ${text}`);
  assert.match(await bubble.locator(".meta").textContent(), /done \(stop\) · tokens: \d+ in, \d+ out/);
  return { deltas: deltas.length, spreadMs: Math.round(spreadMs), seqs: seqs.map(String) };
}

async function cancelledTurn(page, route) {
  const before = (await simRequests()).length;
  await injectStall(3); // the upstream sends 3 tokens, then hangs until cancelled
  const bubble = await ask(page, `Hello, a long question via ${route}`);
  await until("the first delta", async () => (await bubble.locator(".text").textContent()).length > 0, TURN_TIMEOUT);
  await page.click("#cancel");
  await bubble.locator(".meta[data-terminal]").waitFor({ timeout: TURN_TIMEOUT });
  assert.equal(await bubble.locator(".meta").getAttribute("data-terminal"), "cancelled");
  const upstream = await until("the upstream to see the cancellation", async () => {
    const all = await simRequests();
    const mine = all.slice(before);
    return mine.length === 1 && mine[0].disconnected_at !== null ? mine[0] : null;
  });
  assert.equal(upstream.finished_at, null);
  const kinds = (await lastTurn(page, route)).map((e) => e.kind);
  if (route === "websocket") {
    // Full duplex: the cancel is a frame, and the turn's terminal event comes back.
    assert.deepEqual(kinds.slice(-2), ["usage", "done"], kinds.join());
  }
  return { tokensSent: upstream.tokens_sent, kinds };
}

/** A policy answer renders as a list whose `[Source: …]` markers link to the sources list. */
async function renderedAnswer(page) {
  const bubble = await ask(page, "How many checked bags does an Economy Standard fare include?");
  await bubble.locator(".meta[data-terminal]").waitFor({ timeout: TURN_TIMEOUT });
  const items = await bubble.locator(".text ul > li").allTextContents();
  assert.ok(items.length >= 1, "no rendered list items");
  assert.ok(items.some((t) => t.includes("23 kg")), items.join(" | "));
  const link = bubble.locator(".text a.cite").first();
  const href = await link.getAttribute("href");
  assert.match(href, /^#a\d+-src-\d+$/);
  const target = bubble.locator(`.citations li${href}`);
  assert.equal(await target.count(), 1, `no sources entry ${href}`);
  const source = await target.textContent();
  assert.ok(source.startsWith("Baggage Policy, Section 2.1"), source);
  assert.equal(await link.textContent(), "[1]");
  await link.click();
  assert.ok(page.url().endsWith(href));
  assert.equal(await bubble.locator(".text").evaluate((el) => el.textContent.includes("[Source:")), false);

  const hostile = await ask(page, 'hi <img src=x onerror="window.pwned=1"> **there**');
  await hostile.locator(".meta[data-terminal]").waitFor({ timeout: TURN_TIMEOUT });
  assert.equal(await hostile.locator(".text img").count(), 0, "raw HTML was rendered");
  assert.ok((await hostile.locator(".text").textContent()).includes("<img src=x"));
  assert.equal(await page.evaluate(() => window.pwned), undefined);
  await page.screenshot({ path: join(ARTIFACTS, "browser-markdown.png"), fullPage: true });
  return { items: items.length, href, source };
}

const results = {};
let passed = 0;
let failed = 0;
const userDataDir = mkdtempSync(join(tmpdir(), "korero-chromium-"));
mkdirSync(ARTIFACTS, { recursive: true });
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: CHROMIUM,
  headless: true,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
  viewport: { width: 900, height: 700 },
});
try {
  const page = context.pages()[0] ?? (await context.newPage());
  const consoleErrors = [];
  page.on("console", (m) => m.type() === "error" && consoleErrors.push(m.text()));
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  await page.goto(PAGE);
  assert.equal(await page.title(), "Kōrero chat");
  let sessionId = "";
  for (const route of ["grpc-web", "websocket"]) {
    try {
      await page.selectOption("#route", route);
      const answered = await answeredTurn(page, route, `Hello from ${route}`);
      const cancelled = await cancelledTurn(page, route);
      const label = await page.locator("#session").textContent();
      if (sessionId) assert.equal(label, sessionId, "switching routes keeps the session");
      sessionId = label;
      await page.screenshot({ path: join(ARTIFACTS, `browser-${route}.png`), fullPage: true });
      results[route] = { answered, cancelled };
      passed++;
    } catch (err) {
      failed++;
      results[route] = { error: String(err?.stack ?? err) };
      await page.screenshot({ path: join(ARTIFACTS, `browser-${route}-failed.png`) }).catch(() => {});
    }
  }
  // Markdown: a grounded answer's list and its citation link; HTML in text stays text.
  try {
    results.markdown = await renderedAnswer(page);
    passed++;
  } catch (err) {
    failed++;
    results.markdown = { error: String(err?.stack ?? err) };
    await page.screenshot({ path: join(ARTIFACTS, "browser-markdown-failed.png") }).catch(() => {});
  }
  // The gRPC-Web cancel shows up as a cancelled fetch in the console; nothing else may.
  results.consoleErrors = consoleErrors.filter((t) => !/ERR_ABORTED|AbortError|aborted/i.test(t));
  results.session = sessionId;
} finally {
  await context.close();
  rmSync(userDataDir, { recursive: true, force: true });
}
console.log(`E2E ${JSON.stringify(results)}`);
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
