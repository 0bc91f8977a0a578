#!/usr/bin/env bash
# What the browser path needs beyond .venv: Debian chromium (driven by the
# browser tests), Node.js and npm if missing, and the chat page's npm packages
# installed exactly from the lockfile. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -x /usr/lib/chromium/chromium ] || [ -x /usr/bin/chromium ] || need_apt+=(chromium)
{ command -v node && command -v npm; } >/dev/null 2>&1 || need_apt+=(nodejs npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup-web: installing ${need_apt[*]} (Debian packages)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# npm ci: exactly the lockfile; no browser download (playwright-core has none).
(cd clients/web && npm ci --no-audit --no-fund --loglevel=error)
touch clients/web/node_modules/.installed
echo "setup-web: ready (node $(node --version), chromium $( (/usr/lib/chromium/chromium --version || chromium --version) 2>/dev/null | awk '{print $2}'))"
