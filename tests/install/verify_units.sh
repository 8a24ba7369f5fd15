#!/usr/bin/env bash
# The systemd units are valid for this systemd (252 on Debian 12) and say what the daemon
# needs. `systemd-analyze verify` needs ExecStart's binary to exist, so it checks a copy whose
# ExecStart points at the build's binary. It exits 0 on settings it merely ignores ("Failed to
# parse ..., ignoring"), so any output at all is a failure here.
# Usage: verify_units.sh UNIT_DIR BINARY
set -euo pipefail
unit_dir=$1 bin=$2

fail() { echo "FAIL: $*" >&2; exit 1; }
tmp=$(mktemp -d /tmp/rp-units-test.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

unit=$unit_dir/registry-proxy.service
[ -f "$unit" ] || fail "no $unit"
grep -q '^ExecStart=/opt/registry-proxy/bin/registry-proxy serve ' "$unit" ||
  fail "ExecStart is not /opt/registry-proxy/bin/registry-proxy serve ..."
sed "s#^ExecStart=/opt/registry-proxy/bin/registry-proxy #ExecStart=$bin #" "$unit" \
  >"$tmp/registry-proxy.service"
socket=$unit_dir/registry-proxy.socket
[ -f "$socket" ] || fail "no $socket"
cp "$socket" "$tmp/"

if ! out=$(systemd-analyze verify --man=no "$tmp/registry-proxy.socket" "$tmp/registry-proxy.service" 2>&1) ||
  [ -n "$out" ]; then
  fail "systemd-analyze verify:"$'\n'"$out"
fi
echo "systemd-analyze verify: clean"

# What the daemon relies on (a unit can verify and still be wrong for it).
want() {
  grep -qxF -- "$1" "$unit" || fail "$unit lacks '$1'"
}
want 'Type=notify'
want 'Restart=always'
want 'After=containerd.service'
want 'Before=kubelet.service'
want 'ExecReload=/bin/sh -c '"'"'kill -HUP "$$MAINPID"'"'"''
want 'RuntimeDirectory=registry-proxy'
want 'ProtectSystem=strict'
want 'RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6'
want 'SystemCallFilter=@system-service'
want 'WantedBy=multi-user.target'
want 'Wants=registry-proxy.socket'
want 'After=registry-proxy.socket'
# The socket unit: the daemon's default socket, root only, in the runtime directory the service
# keeps (a stopped service must not remove the socket unit's socket).
want_in() {
  grep -qxF -- "$2" "$1" || fail "$1 lacks '$2'"
}
want_in "$socket" 'ListenStream=/run/registry-proxy/registry-proxy.sock'
want_in "$socket" 'SocketMode=0660'
want_in "$socket" 'Before=kubelet.service'
want_in "$socket" 'WantedBy=sockets.target'
want 'RuntimeDirectoryPreserve=yes'
# The daemon's socket is node.listen's default, inside the runtime directory.
grep -q '"unix:///run/registry-proxy/registry-proxy.sock"' "$(dirname "$0")/../../daemon/src/rules/config.h" ||
  fail "node.listen's default is not in /run/registry-proxy (RuntimeDirectory)"

# systemd must wait longer than the daemon's drain before SIGKILL.
grace=$(sed -n 's/^ExecStart=.* --grace \([0-9]*\).*/\1/p' "$unit")
stop=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)$/\1/p' "$unit")
[ -n "$grace" ] && [ -n "$stop" ] || fail "no --grace in ExecStart or no TimeoutStopSec"
[ "$stop" -gt "$grace" ] || fail "TimeoutStopSec=$stop is not more than --grace $grace"
echo "unit settings: ok (grace ${grace}s < TimeoutStopSec ${stop}s)"
echo "PASS"
