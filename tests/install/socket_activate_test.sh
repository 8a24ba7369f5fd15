#!/usr/bin/env bash
# `registry-proxy serve` under real socket activation: systemd-socket-activate (systemd's own
# implementation of the LISTEN_FDS protocol) holds the socket and execs the daemon on the first
# connection; the daemon must serve that socket (not bind its own), answer through it, stop
# on SIGTERM with exit 0 and leave the socket file to its owner.
# Usage: socket_activate_test.sh BINARY CONFIG_YAML
set -euo pipefail
bin=$1 config=$2

fail() { echo "FAIL: $*" >&2; exit 1; }
command -v systemd-socket-activate >/dev/null || fail "systemd-socket-activate is missing (systemd)"
tmp=$(mktemp -d /tmp/rp-sockact.XXXXXX)
pid=
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

cp "$config" "$tmp/config.yaml"
# --listen names another path: the inherited socket must win.
# systemd-socket-activate passes the daemon only the variables named with -E: keep the
# sanitizers' settings (TSan's suppressions for Debian's uninstrumented gRPC and abseil).
env_args=()
for v in TSAN_OPTIONS ASAN_OPTIONS UBSAN_OPTIONS LSAN_OPTIONS; do
  if [ -n "${!v:-}" ]; then env_args+=(-E "$v"); fi
done
systemd-socket-activate "${env_args[@]}" -l "$tmp/rp.sock" -- "$bin" serve --config "$tmp/config.yaml" \
  --listen "unix://$tmp/not-this.sock" --upstream "unix://$tmp/no-containerd.sock" --grace 1 \
  >"$tmp/log" 2>&1 &
pid=$!  # systemd-socket-activate execs the daemon: the same PID
for _ in $(seq 1 100); do [ -S "$tmp/rp.sock" ] && break; sleep 0.05; done
[ -S "$tmp/rp.sock" ] || fail "systemd-socket-activate made no socket"

# The first connection starts the daemon; the answer comes from it (its upstream's error).
out=
for _ in $(seq 1 100); do
  if out=$("$bin" images --endpoint "unix://$tmp/rp.sock" 2>&1); then fail "images succeeded: $out"; fi
  [[ "$out" == *no-containerd.sock* ]] && break
  sleep 0.1
done
[[ "$out" == *UNAVAILABLE*no-containerd.sock* ]] || { cat "$tmp/log" >&2; fail "no answer from the daemon: $out"; }
grep -q "socket-activated" "$tmp/log" || { cat "$tmp/log" >&2; fail "the daemon did not take the socket"; }
[ ! -e "$tmp/not-this.sock" ] || fail "the daemon bound --listen as well"
echo "served the inherited socket: $out"

kill -TERM "$pid"
rc=0
wait "$pid" || rc=$?
pid=
[ "$rc" -eq 0 ] || { cat "$tmp/log" >&2; fail "exit $rc on SIGTERM"; }
[ -S "$tmp/rp.sock" ] || fail "the daemon removed the socket it was given"
echo "PASS"
