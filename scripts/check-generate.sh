#!/usr/bin/env bash
# Fail when the committed generated code differs from what the protos generate.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
.venv/bin/buf generate --template buf.gen.yaml -o "$tmp"
for pkg in chat agent; do  # every package protos/ generates (korero.chat.v1, korero.agent.v1)
  if ! diff -ru --exclude='__pycache__' --exclude='*.pyc' \
       "$tmp/clients/python/korero/$pkg" "clients/python/korero/$pkg"; then
    echo "check-generate: generated code of korero.$pkg is out of date; run 'make generate' and commit" >&2
    exit 1
  fi
done
if [ "$(cd "$tmp/clients/python/korero" && ls -d */ | tr -d / | sort | tr '\n' ' ')" != "agent chat " ]; then
  echo "check-generate: protos/ generates a package this script does not compare; add it" >&2
  exit 1
fi
echo "check-generate: generated code matches protos"
