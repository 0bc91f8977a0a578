#!/usr/bin/env bash
# Create .venv and install everything the project needs: idempotent, and safe
# to run on a fresh Debian/Ubuntu machine with Python 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
"$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
# promtool validates deploy/prometheus/rules.yaml in `make test`; it ships in Debian's
# prometheus package, installed without its recommendations (node exporter, SMART
# tools). Where systemd runs, the package also enables a local Prometheus service.
need_apt_bare=()
command -v promtool >/dev/null 2>&1 || need_apt_bare+=(prometheus)
all_apt=("${need_apt[@]}" "${need_apt_bare[@]}")
if [ ${#all_apt[@]} -gt 0 ]; then
  echo "setup: installing ${all_apt[*]} (Debian packages)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  if [ ${#need_apt[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
  fi
  if [ ${#need_apt_bare[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
      "${need_apt_bare[@]}" >/dev/null
  fi
fi

"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q -c constraints.txt -e clients/python -e '.[dev]'
touch "$VENV/.installed"
echo "setup: ready ($("$VENV/bin/python" --version), grpcio $("$VENV/bin/python" -c 'import grpc; print(grpc.__version__)'))"
