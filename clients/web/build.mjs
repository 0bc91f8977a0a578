// Bundle the chat page into dist/ (generated code must exist: see scripts/build-web.sh).
import { build } from "esbuild";
import { copyFileSync, mkdirSync } from "node:fs";

const out = new URL("./dist/", import.meta.url);
mkdirSync(out, { recursive: true });
await build({
  entryPoints: [new URL("./src/main.ts", import.meta.url).pathname],
  bundle: true,
  format: "iife",
  target: "es2022",
  minify: true,
  sourcemap: true,
  outfile: new URL("app.js", out).pathname,
  logLevel: "warning",
});
for (const name of ["index.html", "app.css"]) {
  copyFileSync(new URL(`./static/${name}`, import.meta.url), new URL(name, out));
}
console.log("build-web: clients/web/dist ready");
