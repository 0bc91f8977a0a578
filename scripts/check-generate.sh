#!/usr/bin/env bash
# Fail when the committed generated code differs from what the protos generate.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
.venv/bin/buf generate --template buf.gen.yaml -o "$tmp"
if ! diff -ru --exclude='__pycache__' --exclude='*.pyc' \
     "$tmp/clients/python/korero/chat" clients/python/korero/chat; then
  echo "check-generate: generated code is out of date; run 'make generate' and commit" >&2
  exit 1
fi
echo "check-generate: generated code matches protos"
