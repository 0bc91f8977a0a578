// Bundle the chat page and the agent desk into dist/ (generated code must exist: see scripts/build-web.sh).
import { build } from "esbuild";
import { copyFileSync, mkdirSync } from "node:fs";

const out = new URL("./dist/", import.meta.url);
mkdirSync(out, { recursive: true });
// Three pages, one build: the chat page (app.js), the agent desk (agent.js) and the
// live operations page (ops.js).
for (const [entry, bundle] of [["main.ts", "app.js"], ["agent.ts", "agent.js"], ["ops.ts", "ops.js"]]) {
  await build({
    entryPoints: [new URL(`./src/${entry}`, import.meta.url).pathname],
    bundle: true,
    format: "iife",
    target: "es2022",
    minify: true,
    sourcemap: true,
    outfile: new URL(bundle, out).pathname,
    logLevel: "warning",
  });
}
for (const name of ["index.html", "agent.html", "app.css", "ops.html", "ops.css"]) {
  copyFileSync(new URL(`./static/${name}`, import.meta.url), new URL(name, out));
}
console.log("build-web: clients/web/dist ready");
