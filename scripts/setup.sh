#!/usr/bin/env bash
# Create .venv and install everything the project needs: idempotent, and safe
# to run on a fresh Debian/Ubuntu machine with Python 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
# promtool validates deploy/prometheus/rules.yaml in `make test`; it ships in Debian's
# prometheus package (where systemd runs, that also enables a local Prometheus service).
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
"$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]} (Debian packages)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q -c constraints.txt -e clients/python -e '.[dev]'
touch "$VENV/.installed"
echo "setup: ready ($("$VENV/bin/python" --version), grpcio $("$VENV/bin/python" -c 'import grpc; print(grpc.__version__)'))"
