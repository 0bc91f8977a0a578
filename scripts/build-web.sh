#!/usr/bin/env bash
# Build the chat page into clients/web/dist: TypeScript from protos/
# (protoc-gen-es), a type check, then one esbuild bundle.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf clients/web/src/gen
.venv/bin/buf generate --template clients/web/buf.gen.yaml
(cd clients/web && node_modules/.bin/tsc -p . && node build.mjs)
