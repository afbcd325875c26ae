#!/usr/bin/env bash
# Three `trustplane serve` instances on loopback behind HAProxy, sharing one PostgreSQL, Redis and
# NATS and nothing else (docs/scaling.md). Runs in the foreground until interrupted; every process
# it started is stopped on exit.
#
#   TRUSTPLANE_KEY_ENCRYPTION_KEY=$(trustplane keys new-kek) deploy/haproxy/run.sh
#
# Settings (environment):
#   TRUSTPLANE_DATABASE_URL  PostgreSQL (default postgresql://postgres@127.0.0.1:5432/trustplane)
#   TRUSTPLANE_REDIS_URL     Redis (default redis://127.0.0.1:6379/0)
#   TRUSTPLANE_NATS_URL      NATS (default nats://127.0.0.1:4222)
#   TRUSTPLANE_KEY_ENCRYPTION_KEY  required: the one KEK all instances share
#   TP_FRONT_PORT            HAProxy's port (default 8000); the issuer is http://127.0.0.1:PORT
#                            unless TRUSTPLANE_ISSUER is set
#   TP_PORT1..3, TP_OPS1..3  the instances' public and operations ports (default 8001-8003, 9471-9473)
#   TP_RUN_DIR               logs and pid files (default ./.trustplane-haproxy)
#   TRUSTPLANE, HAPROXY      the executables (default: trustplane on PATH, /usr/sbin/haproxy)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${TRUSTPLANE_KEY_ENCRYPTION_KEY:?set TRUSTPLANE_KEY_ENCRYPTION_KEY (trustplane keys new-kek)}"
export TRUSTPLANE_DATABASE_URL="${TRUSTPLANE_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/trustplane}"
export TRUSTPLANE_REDIS_URL="${TRUSTPLANE_REDIS_URL:-redis://127.0.0.1:6379/0}"
export TRUSTPLANE_NATS_URL="${TRUSTPLANE_NATS_URL:-nats://127.0.0.1:4222}"
export TP_BIND="${TP_BIND:-127.0.0.1}" TP_FRONT_PORT="${TP_FRONT_PORT:-8000}"
export TP_PORT1="${TP_PORT1:-8001}" TP_PORT2="${TP_PORT2:-8002}" TP_PORT3="${TP_PORT3:-8003}"
export TP_OPS1="${TP_OPS1:-9471}" TP_OPS2="${TP_OPS2:-9472}" TP_OPS3="${TP_OPS3:-9473}"
export TRUSTPLANE_ISSUER="${TRUSTPLANE_ISSUER:-http://127.0.0.1:${TP_FRONT_PORT}}"
TRUSTPLANE="${TRUSTPLANE:-trustplane}"
HAPROXY="${HAPROXY:-/usr/sbin/haproxy}"
run_dir="${TP_RUN_DIR:-$PWD/.trustplane-haproxy}"
mkdir -p "$run_dir"

pids=()
stop() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop EXIT
trap 'exit 143' INT TERM

"$TRUSTPLANE" migrate >"$run_dir/migrate.log" 2>&1

for i in 1 2 3; do
  port_var="TP_PORT$i" ops_var="TP_OPS$i"
  mkdir -p "$run_dir/tp$i"
  TRUSTPLANE_PORT="${!port_var}" TRUSTPLANE_OPS_PORT="${!ops_var}" \
    TRUSTPLANE_DATA_DIR="$run_dir/tp$i" \
    "$TRUSTPLANE" serve >"$run_dir/tp$i.log" 2>&1 &
  pids+=("$!")
  echo "$!" >"$run_dir/tp$i.pid"
done

"$HAPROXY" -db -f "$here/haproxy.cfg" >"$run_dir/haproxy.log" 2>&1 &
haproxy_pid="$!"
pids+=("$haproxy_pid")
echo "$haproxy_pid" >"$run_dir/haproxy.pid"
echo "trustplane: 3 instances behind HAProxy at http://${TP_BIND}:${TP_FRONT_PORT} (logs: $run_dir)"
# runs as long as HAProxy does: an instance that dies is taken out of rotation by the health
# checks, and the other two keep serving
wait "$haproxy_pid" || true
