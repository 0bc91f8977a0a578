// A full human handoff in real Chromium, through Envoy: a customer page and an
// agent page side by side.
//
// Run by tests/browser/test_handoff_page.py, which starts Redis, the simulated
// upstream, Kōrero and Envoy and passes KORERO_PAGE_URL, KORERO_ARTIFACTS and
// CHROMIUM (see e2e.mjs). The customer complains on the WebSocket route; the
// agent signs in on agent.html, accepts the offer, reads the context packet,
// chats, and hands the conversation back; the customer then gets a bot answer
// again. Prints one `HANDOFF {json}` line, then `N passed, N failed`.

import assert from "node:assert/strict";
import { mkdtempSync, rmSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const PAGE = process.env.KORERO_PAGE_URL;
const ARTIFACTS = process.env.KORERO_ARTIFACTS ?? "artifacts";
const CHROMIUM = process.env.CHROMIUM ?? "/usr/lib/chromium/chromium";
assert.ok(PAGE, "KORERO_PAGE_URL is required");
const WAIT = 15_000;

const COMPLAINT = "This is the third time my bag was lost, I am furious!!";

async function customerEvents(page, kind) {
  return (await page.evaluate(() => window.korero.events)).filter((e) => e.kind === kind);
}

async function deskEvents(page, kind) {
  return (await page.evaluate(() => window.desk.events)).filter((e) => e.kind === kind);
}

async function until(what, predicate, timeoutMs = WAIT) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const value = await predicate();
    if (value) return value;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

const results = {};
let passed = 0;
let failed = 0;
const userDataDir = mkdtempSync(join(tmpdir(), "korero-chromium-"));
mkdirSync(ARTIFACTS, { recursive: true });
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: CHROMIUM,
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  viewport: { width: 1000, height: 720 },
});
const consoleErrors = [];
let customer;
let agent;
try {
  customer = context.pages()[0] ?? (await context.newPage());
  agent = await context.newPage();
  for (const page of [customer, agent]) {
    page.on("console", (m) => m.type() === "error" && consoleErrors.push(m.text()));
    page.on("pageerror", (e) => consoleErrors.push(String(e)));
  }
  await agent.goto(new URL("agent.html", PAGE).href);
  assert.equal(await agent.title(), "Kōrero agent desk");
  await agent.fill("#agent-name", "Mere");
  await agent.fill("#agent-skills", "complaints");
  await agent.click("#join-button");
  await until("the agent to sign in", async () => (await agent.locator("body").getAttribute("data-desk")) === "joined");

  await customer.goto(PAGE);
  await customer.selectOption("#route", "websocket");
  await customer.fill("#input", COMPLAINT);
  await customer.click("#send");
  // The bot says so in plain words, then the queue, all on the customer's page.
  const answer = customer.locator(".msg.assistant").last();
  await answer.locator(".meta[data-terminal]").waitFor({ timeout: WAIT });
  assert.match(await answer.locator(".text").textContent(), /member of our team/);
  await until("the queued notice", async () => (await customerEvents(customer, "handoffQueued")).length > 0);
  assert.match(await customer.locator(".msg.notice").last().textContent(), /number 1 in the queue/);

  // The agent is offered the conversation with its context, and accepts.
  const offer = agent.locator("#offers li.offer");
  await offer.waitFor({ timeout: WAIT });
  assert.match(await offer.textContent(), /complaint/);
  await agent.screenshot({ path: join(ARTIFACTS, "handoff-agent-offer.png"), fullPage: true });
  await offer.locator("button.accept").click();
  await agent.locator("#conversation:not([hidden])").waitFor({ timeout: WAIT });
  const why = await agent.locator('#context dd[data-field="why"]').textContent();
  assert.match(why, /complaint/);
  const sentiment = await agent.locator('#context dd[data-field="sentiment"]').textContent();
  assert.match(sentiment, /^-0\.\d\d/);
  assert.match(await agent.locator("#transcript").textContent(), /third time my bag was lost/);
  await until("the customer to see the agent join", async () => (await customerEvents(customer, "agentJoined")).length > 0);
  assert.match(await customer.locator(".msg.notice").last().textContent(), /Mere joined/);

  // They talk: agent → customer, customer → agent (the bot stays silent).
  await agent.fill("#reply-input", "Kia ora, I'm Mere. I'm sorry about your bag; let me trace it now.");
  await agent.click("#reply-send");
  await customer.locator(".msg.agent").waitFor({ timeout: WAIT });
  assert.match(await customer.locator(".msg.agent").last().textContent(), /I'm Mere/);
  await customer.fill("#input", "Thank you, it is a blue suitcase with a red tag");
  await customer.click("#send");
  await until("the agent to get the message", async () => (await deskEvents(agent, "customerMessage")).length > 0);
  assert.match(await agent.locator("#transcript").textContent(), /blue suitcase/);
  await until("the customer's message to be acknowledged", async () => (await customerEvents(customer, "messageRelayed")).length === 1);
  await customer.screenshot({ path: join(ARTIFACTS, "handoff-customer-with-agent.png"), fullPage: true });
  await agent.screenshot({ path: join(ARTIFACTS, "handoff-agent-chat.png"), fullPage: true });

  // The agent hands back; the bot answers the next question.
  await agent.click("#hand-back");
  await until("the handoff to end", async () => (await customerEvents(customer, "handoffEnded")).length > 0);
  assert.match(await customer.locator(".msg.notice").last().textContent(), /back with our virtual assistant/);
  await customer.fill("#input", "How many bags can I check?");
  await customer.click("#send");
  const back = customer.locator(".msg.assistant").last();
  await back.locator(".meta[data-terminal]").waitFor({ timeout: WAIT });
  assert.equal(await back.locator(".meta").getAttribute("data-terminal"), "stop");
  await customer.screenshot({ path: join(ARTIFACTS, "handoff-customer-back-to-bot.png"), fullPage: true });

  // seq only ever grew on the customer's stream, across turns and handoff events.
  const seqs = (await customer.evaluate(() => window.korero.events)).map((e) => BigInt(e.seq));
  for (let i = 1; i < seqs.length; i++) assert.ok(seqs[i] >= seqs[i - 1], `seq went back: ${seqs}`);
  results.customerKinds = (await customer.evaluate(() => window.korero.events)).map((e) => e.kind);
  results.deskKinds = (await agent.evaluate(() => window.desk.events)).map((e) => e.kind);
  passed++;
} catch (err) {
  failed++;
  results.error = String(err?.stack ?? err);
  await customer?.screenshot({ path: join(ARTIFACTS, "handoff-customer-failed.png") }).catch(() => {});
  await agent?.screenshot({ path: join(ARTIFACTS, "handoff-agent-failed.png") }).catch(() => {});
} finally {
  await context.close();
  rmSync(userDataDir, { recursive: true, force: true });
}
results.consoleErrors = consoleErrors;
console.log(`HANDOFF ${JSON.stringify(results)}`);
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
