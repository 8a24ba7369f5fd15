#!/usr/bin/env bash
# Ctrl-C on scripts/run.sh's demo: SIGINT reaches rp-testbed (the whole process group gets it)
# and run.sh's cleanup sends SIGTERM right after. rp-testbed must still stop everything and
# remove both of its dirs (rp-testbed.* and the test image's rp-testimage.*), and exit 0.
# Runs it in a private TMPDIR, so anything left there was left by it. Skips (77) where
# rp-testbed cannot run (not root, packages missing) unless RP_REQUIRE_INTEGRATION=1.
#
#   testbed_signal_test.sh RP_TESTBED_BINARY
set -euo pipefail
testbed=$1
tmp=$(mktemp -d /tmp/rp-sigtest.XXXXXX)
pid=""
cleanup() {
  [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT
mkdir "$tmp/t"

for signals in "INT TERM" "TERM INT" "INT"; do
  TMPDIR="$tmp/t" "$testbed" up --mirror-only --env "$tmp/env" > "$tmp/out.json" 2> "$tmp/log" &
  pid=$!
  for _ in $(seq 1 600); do
    [ -f "$tmp/env" ] && break
    if ! kill -0 "$pid" 2>/dev/null; then
      rc=0
      wait "$pid" || rc=$?
      pid=""
      why=$(sed -n 's/^rp-testbed: cannot run here: //p' "$tmp/log")
      if [ "$rc" -eq 1 ] && [ -n "$why" ] && [ "${RP_REQUIRE_INTEGRATION:-0}" != 1 ]; then
        echo "SKIPPED: rp-testbed cannot run here: $why"
        exit 77
      fi
      echo "FAIL: rp-testbed exited $rc before it was up:"
      cat "$tmp/log"
      exit 1
    fi
    sleep 0.1
  done
  [ -f "$tmp/env" ] || { echo "FAIL: rp-testbed not up after 60 s"; cat "$tmp/log"; exit 1; }
  for s in $signals; do kill -"$s" "$pid"; done  # back to back, as Ctrl-C then run.sh's cleanup
  rc=0
  wait "$pid" || rc=$?
  pid=""
  left=$(ls -A "$tmp/t")
  if [ "$rc" -ne 0 ] || [ -n "$left" ]; then
    echo "FAIL: after SIG${signals// / + SIG}: exit $rc (want 0), left in TMPDIR: ${left:-nothing}"
    cat "$tmp/log"
    exit 1
  fi
  echo "ok: SIG${signals// / + SIG}: exit 0, nothing left"
  rm -f "$tmp/env"
done
