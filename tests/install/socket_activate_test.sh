#!/usr/bin/env bash
# `registry-proxy serve` under real socket activation: systemd-socket-activate (systemd's own
# implementation of the LISTEN_FDS protocol) holds the socket and execs the daemon on the first
# connection; the daemon must serve that socket (not bind its own), answer through it, stop
# on SIGTERM with exit 0 and leave the socket file to its owner.
#
# Each daemon here starts 0.3 s after its first connection (as a daemon that is starting does,
# and a containerd busy or starting): the socket accepts at once, the answer (HTTP/2 SETTINGS)
# comes later. The first CLI call must wait for it (issue 12, defect 5b: it gave up after
# ~0.1 s with "connection attempt timed out before receiving SETTINGS frame"), and so must the
# daemon's own channel to its upstream (here a second socket-activated daemon in containerd's
# place): a pull through it must get the upstream's answer, not that time-out.
# Usage: socket_activate_test.sh BINARY CONFIG_YAML
set -euo pipefail
bin=$1 config=$2

fail() { echo "FAIL: $*" >&2; exit 1; }
command -v systemd-socket-activate >/dev/null || fail "systemd-socket-activate is missing (systemd)"
tmp=$(mktemp -d /tmp/rp-sockact.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do
    if kill -0 "$p" 2>/dev/null; then kill -KILL "$p" 2>/dev/null || true; fi
  done
  rm -rf "$tmp"
}
trap cleanup EXIT

cp "$config" "$tmp/config.yaml"
# systemd-socket-activate passes the daemon only the variables named with -E: keep the
# sanitizers' settings (TSan's suppressions for Debian's uninstrumented gRPC and abseil).
env_args=()
for v in TSAN_OPTIONS ASAN_OPTIONS UBSAN_OPTIONS LSAN_OPTIONS; do
  if [ -n "${!v:-}" ]; then env_args+=(-E "$v"); fi
done
# activate SOCKET UPSTREAM LOG: a daemon on SOCKET, started 0.3 s after the first connection
# (sh execs it: the PID systemd-socket-activate set in LISTEN_PID stays). --listen names
# another path: the inherited socket must win.
activate() {
  systemd-socket-activate "${env_args[@]}" -l "$1" -- /bin/sh -c 'sleep 0.3; exec "$@"' sh \
    "$bin" serve --config "$tmp/config.yaml" --listen "unix://$tmp/not-this.sock" \
    --upstream "unix://$2" --grace 1 >"$3" 2>&1 &
  pids+=($!)  # systemd-socket-activate execs the daemon: the same PID
  for _ in $(seq 1 100); do [ -S "$1" ] && break; sleep 0.05; done
  [ -S "$1" ] || fail "systemd-socket-activate made no socket $1"
}
activate "$tmp/up.sock" "$tmp/no-containerd.sock" "$tmp/up.log"
activate "$tmp/rp.sock" "$tmp/up.sock" "$tmp/log"
logs() { echo "--- daemon log:" >&2; cat "$tmp/log" >&2; echo "--- upstream daemon log:" >&2; cat "$tmp/up.log" >&2; }

# The first connection starts the daemon, whose first pull starts its upstream: the answer is
# the upstream's own (its upstream, "containerd", is missing), passed back unchanged. One call,
# no retry. 127.0.0.1:9 is in no rule: the pull goes upstream as it is.
rc=0
out=$("$bin" pull 127.0.0.1:9/none/x:1 --endpoint "unix://$tmp/rp.sock" --timeout 30s 2>&1) || rc=$?
[ "$rc" -ne 0 ] || fail "the pull succeeded: $out"
[[ "$out" != *"SETTINGS frame"* ]] || { logs; fail "a connection gave up before the SETTINGS frame: $out"; }
[[ "$out" == *UNAVAILABLE*no-containerd.sock* ]] || { logs; fail "no answer from the upstream daemon: $out"; }
echo "first pull, through two starting daemons: $out"

out=
if out=$("$bin" images --endpoint "unix://$tmp/rp.sock" --timeout 30s 2>&1); then fail "images succeeded: $out"; fi
[[ "$out" == *UNAVAILABLE*no-containerd.sock* ]] || { logs; fail "no answer from the daemon: $out"; }
grep -q "socket-activated" "$tmp/log" || { logs; fail "the daemon did not take the socket"; }
grep -q "socket-activated" "$tmp/up.log" || { logs; fail "the upstream daemon did not take the socket"; }
[ ! -e "$tmp/not-this.sock" ] || fail "the daemon bound --listen as well"
echo "served the inherited socket: $out"

# No daemon at all: the CLI waits its --timeout, then says UNAVAILABLE (not a bare deadline).
start=$(date +%s%N)
if out=$("$bin" images --endpoint "unix://$tmp/nothing.sock" --timeout 1s 2>&1); then fail "images succeeded: $out"; fi
ms=$((($(date +%s%N) - start) / 1000000))
[[ "$out" == *UNAVAILABLE* ]] || fail "no daemon: want UNAVAILABLE, got: $out"
[ "$ms" -ge 900 ] || fail "no daemon: gave up after $ms ms, before its --timeout 1s"
echo "no daemon: $out (after $ms ms)"

for i in 1 0; do
  p=${pids[$i]}
  kill -TERM "$p"
  rc=0
  wait "$p" || rc=$?
  [ "$rc" -eq 0 ] || { logs; fail "exit $rc on SIGTERM"; }
done
pids=()
[ -S "$tmp/rp.sock" ] || fail "the daemon removed the socket it was given"
echo "PASS"
