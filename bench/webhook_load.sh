#!/usr/bin/env bash
# Load benchmark of the admission webhook on loopback. Starts `registry-proxy webhook` with a
# throwaway certificate (openssl), then:
#   1. open loop at fixed rates (bench/webhook_load: p50/p99 measured from when each request
#      was due, over keep-alive TLS connections), the goal being p99 < 2 ms at 1,000 req/s;
#   2. closed loop with wrk (Debian's wrk 4 has no fixed rate) at a few connection counts:
#      the most it does, and its latency then;
#   3. the webhook's RSS (now and peak) and thread count.
# Everything is bounded in time (RP_BENCH_SECONDS per open-loop run, default 10; 5 s per wrk
# run) and stopped by PID. Numbers only: nothing here passes or fails on speed.
#
#   bench/webhook_load.sh [BUILD_DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-${RP_BUILD_DIR:-$root/build}}
seconds=${RP_BENCH_SECONDS:-10}
bin=$build/daemon/registry-proxy
load=$build/bench/webhook_load
body=$root/tests/data/admission/pod_create_no_annotations.json
for f in "$bin" "$load"; do [ -x "$f" ] || { echo "missing $f (build first)" >&2; exit 1; }; done

tmp=$(mktemp -d)
pid=
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    wait "$pid" || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$tmp/tls.key" \
  -out "$tmp/tls.crt" -days 1 -subj /CN=localhost -addext subjectAltName=IP:127.0.0.1 2>/dev/null
"$bin" webhook --listen 127.0.0.1:0 --tls-cert "$tmp/tls.crt" --tls-key "$tmp/tls.key" \
  --config "$root/config/config.yaml" > "$tmp/log" 2>&1 &  # info: one line per event, none per review
pid=$!
port=
for _ in $(seq 100); do
  port=$(grep -o 'serving https://127.0.0.1:[0-9]*' "$tmp/log" | grep -o '[0-9]*$' || true)
  [ -n "$port" ] && break
  sleep 0.1
done
[ -n "$port" ] || { echo "webhook did not start:"; cat "$tmp/log"; exit 1; }
url=https://127.0.0.1:$port/mutate
rss() { awk '/^VmRSS|^VmHWM|^Threads/ {printf "%s %s %s  ", $1, $2, $3} END {print ""}' "/proc/$pid/status"; }

echo "== webhook pid $pid on 127.0.0.1:$port; body $(wc -c < "$body") bytes ($(basename "$body"))"
echo "-- at start: $(rss)"
"$load" --port "$port" --body "$body" --rate 500 --seconds 2 --connections 2 >/dev/null  # warm-up
for rate in 1000 2000; do
  echo "-- open loop, $rate req/s, 4 connections, ${seconds} s"
  "$load" --port "$port" --body "$body" --rate "$rate" --seconds "$seconds" --connections 4 || true
  echo "   $(rss)"
done

if command -v wrk >/dev/null; then
  cat > "$tmp/post.lua" <<'LUA'
local f = assert(io.open(os.getenv("RP_WRK_BODY"), "rb"))
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = f:read("*a")
f:close()
LUA
  for c in 1 4 16; do
    echo "-- wrk closed loop, $c connection(s), 5 s"
    RP_WRK_BODY=$body wrk -t"$(( c < 2 ? c : 2 ))" -c"$c" -d5s --timeout 2s --latency -s "$tmp/post.lua" "$url" |
      grep -E "Requests/sec|Latency  |50%|99%|Non-2xx|Socket errors" || true
    echo "   $(rss)"
  done
else
  echo "-- wrk not installed: closed-loop runs skipped"
fi
echo "-- at end: $(rss)"
