// The live operations page in real Chromium, through Envoy.
//
// Run by tests/browser/test_ops_page.py, which starts Redis, the simulated
// upstream, Kōrero (KORERO_OPS_TOKEN set) and Envoy, and passes:
//   KORERO_OPS_URL   the page through Envoy, e.g. http://127.0.0.1:18080/ops.html?every=500
//   KORERO_OPS_TOKEN the admin token
//   KORERO_ARTIFACTS where screenshots go
//   CHROMIUM         the browser binary (default /usr/lib/chromium/chromium)
// Prints `READY` once the page shows live numbers (the test then makes
// traffic), then one `OPS {json}` line with what the tiles showed.

import assert from "node:assert/strict";
import { mkdtempSync, rmSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const URL_ = process.env.KORERO_OPS_URL;
const TOKEN = process.env.KORERO_OPS_TOKEN;
const ARTIFACTS = process.env.KORERO_ARTIFACTS ?? "artifacts";
const CHROMIUM = process.env.CHROMIUM ?? "/usr/lib/chromium/chromium";
assert.ok(URL_ && TOKEN, "KORERO_OPS_URL and KORERO_OPS_TOKEN are required");

async function until(what, predicate, timeoutMs) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const value = await predicate();
    if (value) return value;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

const tiles = (page) =>
  page.evaluate(() =>
    Object.fromEntries(
      [...document.querySelectorAll(".tile")].map((t) => [
        t.dataset.stat,
        {
          value: t.querySelector(".value").textContent,
          detail: t.querySelector(".detail")?.textContent ?? "",
          alert: t.dataset.alert === "true",
        },
      ]),
    ),
  );

const number = (text) => Number.parseFloat(text);

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
  viewport: { width: 1000, height: 600 },
});
let failed = false;
const results = {};
try {
  const page = context.pages()[0] ?? (await context.newPage());
  const consoleErrors = [];
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  await page.goto(URL_);
  assert.equal(await page.title(), "Kōrero — live operations");
  assert.equal(await page.getAttribute("body", "data-state"), "token");
  // A wrong token is refused, and the page says so.
  await page.fill("#token", "not-the-token");
  await page.click("#token-form button");
  await until("the refusal", async () => (await page.textContent("#token-error")).includes("refused"), 10_000);
  results.refusals = await page.evaluate(() => window.koreroOps.refusals);
  // The right one: numbers, refreshed on their own.
  await page.fill("#token", TOKEN);
  await page.click("#token-form button");
  await until("live numbers", async () => (await page.getAttribute("body", "data-state")) === "live", 10_000);
  console.log("READY");
  const shown = await until(
    "every tile to show the test's traffic",
    async () => {
      const t = await tiles(page);
      const ok =
        number(t.active_streams.value) >= 2 &&
        number(t.turns_per_second.value) > 0 &&
        t.ttft_p50.value.endsWith("ms") &&
        t.ttft_p95.value.endsWith("ms") &&
        number(t.cache_hit_rate.value) > 0 &&
        number(t.limits_hit.value) >= 1 &&
        number(t.upstream_errors.value) >= 1;
      return ok && t;
    },
    30_000,
  );
  const before = await page.evaluate(() => window.koreroOps.updates);
  await until("two more refreshes", async () => (await page.evaluate(() => window.koreroOps.updates)) >= before + 2, 10_000);
  results.tiles = shown;
  results.updates = await page.evaluate(() => window.koreroOps.updates);
  results.last = await page.evaluate(() => window.koreroOps.last);
  results.consoleErrors = consoleErrors;
  await page.screenshot({ path: join(ARTIFACTS, "ops-page.png"), fullPage: true });
} catch (err) {
  failed = true;
  results.error = String(err?.stack ?? err);
  const page = context.pages()[0];
  if (page) {
    results.tilesAtFailure = await tiles(page).catch(() => null);
    await page.screenshot({ path: join(ARTIFACTS, "ops-page-failed.png") }).catch(() => {});
  }
} finally {
  await context.close();
  rmSync(userDataDir, { recursive: true, force: true });
}
console.log(`OPS ${JSON.stringify(results)}`);
process.exit(failed ? 1 : 0);
