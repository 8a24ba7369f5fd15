#!/usr/bin/env bash
# The host installs under a real systemd: a Debian 12 root (debootstrapped once, cached as a
# tarball, unpacked fresh for every run) booted with `systemd-nspawn -b`, systemd as its PID 1,
# Debian's containerd and runc running in it as units. Everything is done as a user would, with
# the real systemctl, journalctl, dpkg and apt-get inside (README.md "Install on a node with
# systemd", "Install the .deb"):
#
#   node install / uninstall (the root identical afterwards), --configure-kubelet with a stub
#   kubelet.service, idempotence, reload (same PID), restart under a stream of CLI calls,
#   socket activation, the CLI against a daemon that is starting (issue 12, 5b), SIGKILL ->
#   restarted, reboot -> ready before kubelet, upgrade and downgrade of the bundle under load,
#   the node's pods as shipped (the installer's init container: node install --host-root from
#   its own mount namespace, hostPID; config-sync: sync-config without capabilities, no
#   hostPID), the .deb (install, reinstall, remove, purge: /opt, /etc, /lib/systemd/system
#   survive, issue 12, 5c).
#
# Usage: nspawn_test.sh BINARY BUILD_DIR
#   BINARY     the registry-proxy built here (bundled with scripts/bundle.sh)
#   BUILD_DIR  its build tree (cpack -G DEB runs on a copy of its CPackConfig.cmake)
# Exit 77 (ctest: skipped) when it cannot run here: not root, no systemd-nspawn/debootstrap, no
# cgroup trees, no cached root and no network for debootstrap. RP_REQUIRE_INTEGRATION=1 (CI)
# turns those into failures.
# Env: RP_NSPAWN_CACHE (default ~/.cache/registry-proxy), RP_DEBIAN_MIRROR
# (default http://deb.debian.org/debian), RP_NSPAWN_KEEP=1 keeps the temp dir on failure.
set -euo pipefail
export LC_ALL=C

bin=$(readlink -f "$1")
build=$(readlink -f "$2")
src=$(cd "$(dirname "$0")/../.." && pwd)

T0=$(date +%s)
passed=0
log() { echo "[$(($(date +%s) - T0))s] $*"; }
fail() {
  echo "FAIL: $*" >&2
  FAILED=1
  exit 1
}
ok() {
  passed=$((passed + 1))
  echo "  ok $passed - $*"
}
# check "what" CMD...: an assertion; stops the suite on failure (what follows builds on it).
check() {
  local what=$1
  shift
  if "$@" >"$tmp/check.out"; then ok "$what"; else
    cat "$tmp/check.out" >&2
    fail "$what (command: $*)"
  fi
}
skip() {
  if [ "${RP_REQUIRE_INTEGRATION:-0}" = 1 ]; then
    echo "FAIL: cannot run: $* (RP_REQUIRE_INTEGRATION=1)" >&2
    exit 1
  fi
  echo "SKIP: $*"
  exit 77
}

# ---------------------------------------------------------------------------------------------
# Can it run here?
[ "$(id -u)" -eq 0 ] || skip "needs root (systemd-nspawn, cgroups, mounts)"
for t in systemd-nspawn debootstrap nsenter unshare cpack patchelf sha256sum; do
  command -v "$t" >/dev/null || skip "$t is missing (packages systemd-container, debootstrap)"
done
[ -x "$bin" ] || fail "$bin is not built"
[ -f "$build/CPackConfig.cmake" ] || fail "$build/CPackConfig.cmake missing (not a build tree)"
[ -d /sys/fs/cgroup/systemd ] && [ -d /sys/fs/cgroup/unified ] ||
  skip "no /sys/fs/cgroup/{systemd,unified} (the hybrid cgroup layout this suite boots in)"

# ---------------------------------------------------------------------------------------------
# The cached root: Debian 12 with systemd, dbus, containerd and runc. The key names what is in
# it; a new list makes a new tarball (and the old ones go). procps: a Debian node has it
# (priority important; minbase has only the required ones).
PKGS=systemd,systemd-sysv,dbus,ca-certificates,iproute2,procps,containerd,runc
SUITE=bookworm
MIRROR=${RP_DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${RP_NSPAWN_CACHE:-$HOME/.cache/registry-proxy}
key=$(echo "$SUITE $PKGS minbase v1" | sha256sum | cut -c1-12)
tarball=$CACHE/nspawn-root-$key.tar

tmp=$(mktemp -d /tmp/rp-nspawn.XXXXXX)
root=$tmp/root
NAME=rp-nspawn-$$
CG_SD=/sys/fs/cgroup/systemd/$NAME
CG_V2=/sys/fs/cgroup/unified/$NAME
orig_sd=$(sed -n 's/^[0-9]*:name=systemd://p' /proc/$$/cgroup)
orig_v2=$(sed -n 's/^0:://p' /proc/$$/cgroup)
NSPAWN='' LEADER='' WATCH='' LOAD=''
FAILED=0
# nspawn outside a cgroup of its own leaves /payload and /supervisor at the top of the trees:
# note which are there before, to tell ours apart.
stray_cgroups() {
  local d
  for d in /sys/fs/cgroup/{systemd,unified}/{payload,supervisor}; do [ -d "$d" ] && echo "$d"; done
  return 0
}
stray_before=$(stray_cgroups)

# Stops everything this run started, by PID; leaves no mount, cgroup or temp dir.
cleanup() {
  local rc=$?
  trap - EXIT INT TERM ERR
  set +e
  [ "$rc" -ne 0 ] && [ "$rc" -ne 77 ] && FAILED=1
  if [ "$FAILED" = 1 ] && [ -n "$LEADER" ] && kill -0 "$LEADER" 2>/dev/null; then
    echo "--- journal (registry-proxy, kubelet, containerd; last 60 lines):" >&2
    nsenter -t "$LEADER" -a journalctl --no-pager -n 60 -u registry-proxy -u registry-proxy.socket \
      -u kubelet -u containerd >&2 2>&1
  fi
  for p in "$WATCH" "$LOAD"; do
    [ -n "$p" ] && kill -KILL -- "-$p" 2>/dev/null
  done
  if [ -n "$NSPAWN" ] && kill -0 "$NSPAWN" 2>/dev/null; then
    [ -n "$LEADER" ] && timeout 10 nsenter -t "$LEADER" -a systemctl poweroff 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$NSPAWN" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$NSPAWN" 2>/dev/null
    wait "$NSPAWN" 2>/dev/null
  fi
  # Whatever is still in our cgroups (the container's processes if nspawn was killed).
  local d p
  for d in "$CG_SD" "$CG_V2"; do
    [ -d "$d" ] || continue
    for p in $(find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null); do
      [ "$p" != $$ ] && kill -KILL "$p" 2>/dev/null
    done
  done
  # Back to where we came from, then remove ours (children first).
  echo $$ >"/sys/fs/cgroup/systemd${orig_sd}/cgroup.procs" 2>/dev/null
  echo $$ >"/sys/fs/cgroup/unified${orig_v2}/cgroup.procs" 2>/dev/null
  for d in "$CG_SD" "$CG_V2"; do
    [ -d "$d" ] || continue
    for _ in $(seq 1 50); do
      find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
      [ -d "$d" ] || break
      sleep 0.1
    done
    [ -d "$d" ] && echo "WARNING: cgroup $d left behind" >&2
  done
  rm -rf "/run/systemd/nspawn/propagate/$NAME" 2>/dev/null
  if [ "$(stray_cgroups)" != "$stray_before" ]; then
    echo "FAIL: nspawn left cgroups at the top of the trees: $(stray_cgroups)" >&2
    FAILED=1
    [ -z "$stray_before" ] && stray_cgroups | while read -r d; do rmdir "$d"; done
  fi
  # Mounts under the temp dir (none should be left; a failed step may leave one).
  grep -o " ${tmp}[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m"; done
  if [ "$FAILED" = 1 ] && [ "${RP_NSPAWN_KEEP:-0}" = 1 ]; then
    echo "kept $tmp" >&2
  else
    rm -rf "$tmp"
  fi
  echo "$passed checks passed ($(($(date +%s) - T0)) s)"
  [ "$FAILED" = 1 ] && [ "$rc" -eq 0 ] && rc=1
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; FAILED=1; exit 130' INT TERM
trap 'echo "FAIL: line $LINENO: $BASH_COMMAND" >&2; FAILED=1' ERR

if [ ! -f "$tarball" ]; then
  log "no cached root: debootstrap $SUITE ($PKGS) -> $tarball"
  # Network check first: no network is a skip, not a failure (outside CI).
  if ! timeout 20 bash -c "exec 3<>/dev/tcp/$(echo "$MIRROR" | sed -E 's#^[a-z]+://([^/:]+).*#\1#')/80" \
    2>/dev/null; then
    skip "no cached root and $MIRROR is unreachable"
  fi
  mkdir -p "$CACHE" "$tmp/bootstrap"
  if ! timeout 900 debootstrap --variant=minbase --include="$PKGS" "$SUITE" "$tmp/bootstrap" \
    "$MIRROR" >"$tmp/debootstrap.log" 2>&1; then
    tail -20 "$tmp/debootstrap.log" >&2
    fail "debootstrap failed"
  fi
  rm -rf "$tmp/bootstrap/var/cache/apt/archives/"*.deb "$tmp/bootstrap/var/lib/apt/lists/"*_Packages
  tar -C "$tmp/bootstrap" -cf "$tarball.tmp.$$" . && mv "$tarball.tmp.$$" "$tarball"
  find "$CACHE" -maxdepth 1 -name 'nspawn-root-*.tar' ! -name "$(basename "$tarball")" -delete
  rm -rf "$tmp/bootstrap"
  log "cached $(du -h "$tarball" | cut -f1)"
fi
mkdir "$root"
tar -C "$root" -xf "$tarball" || fail "cannot unpack $tarball"
log "root unpacked from $tarball"

# ---------------------------------------------------------------------------------------------
# What the tests bring in (bind-mounted read-only at /x): two bundles that differ only in a
# marker appended to the binary (an upgrade and a downgrade change the installed binary), the
# .deb, a config, a stub kubelet.
mkdir -p "$tmp/x"
"$src/scripts/bundle.sh" "$bin" "$tmp/x/v1" >"$tmp/bundle.log" 2>&1 ||
  { cat "$tmp/bundle.log" >&2; fail "scripts/bundle.sh failed"; }
cp -a "$tmp/x/v1" "$tmp/x/v2"
printf '\nregistry-proxy-test-bundle-v2\n' >>"$tmp/x/v2/opt/registry-proxy/bin/registry-proxy"
"$tmp/x/v2/opt/registry-proxy/bin/registry-proxy" --version >/dev/null 2>&1 ||
  fail "the v2 bundle (marker appended) does not run"
V1=$(sha256sum <"$tmp/x/v1/opt/registry-proxy/bin/registry-proxy" | cut -d' ' -f1)
V2=$(sha256sum <"$tmp/x/v2/opt/registry-proxy/bin/registry-proxy" | cut -d' ' -f1)
(cd "$tmp" && cpack -G DEB -B "$tmp/deb" --config "$build/CPackConfig.cmake" >"$tmp/cpack.log" 2>&1) ||
  { cat "$tmp/cpack.log" >&2; fail "cpack -G DEB failed"; }
debs=("$tmp"/deb/registry-proxy_*.deb)
[ -f "${debs[0]}" ] || fail "cpack made no .deb"
cp "${debs[0]}" "$tmp/x/"
DEB=/x/$(basename "${debs[0]}")
# The config: the repository's, with every mirror on a port that refuses (no network here
# anyway: --private-network).
sed -E 's/: [a-z0-9.-]+\.ketches\.cn/: 127.0.0.1:9/' "$src/config/config.yaml" >"$tmp/x/config.yaml"
"$bin" check-config "$tmp/x/config.yaml" >/dev/null || fail "test config does not validate"
cat >"$tmp/x/snapshot.sh" <<'EOF'
prune='( -path /proc -o -path /sys -o -path /dev -o -path /run -o -path /tmp -o -path /x
  -o -path /var/log -o -path /var/cache -o -path /var/tmp -o -path /var/lib/systemd
  -o -path /var/lib/containerd -o -path /var/lib/dpkg -o -path /var/lib/apt -o -path /var/lib/dbus )'
set -f
find / -xdev $prune -prune -o -printf '%p %y %m %U:%G %l\n'
find / -xdev $prune -prune -o -type f -print0 | xargs -0 -r sha256sum
EOF
log "bundles v1, v2 and $(basename "$DEB") ready"

# Inside the root, before the first boot: containerd never goes to the internet (every
# registry it might resolve is pinned to 127.0.0.1:9), a stub kubelet with a config file.
mkdir -p "$root/etc/containerd/certs.d/_default" "$root/var/lib/kubelet" "$root/x"
# containerd's "opt" plugin would make /opt/containerd: /opt stays empty, as on a host where
# the .deb must not remove it (issue 12, 5c).
cat >"$root/etc/containerd/config.toml" <<'EOF'
version = 2
[plugins."io.containerd.internal.v1.opt"]
  path = "/var/lib/containerd/opt"
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "/etc/containerd/certs.d"
EOF
for reg in _default docker.io registry.k8s.io quay.io ghcr.io gcr.io; do
  mkdir -p "$root/etc/containerd/certs.d/$reg"
  cat >"$root/etc/containerd/certs.d/$reg/hosts.toml" <<'EOF'
server = "http://127.0.0.1:9"
[host."http://127.0.0.1:9"]
  capabilities = ["pull", "resolve"]
EOF
done
cat >"$root/etc/systemd/system/kubelet.service" <<'EOF'
[Unit]
Description=kubelet (test stub)
After=containerd.service
[Service]
ExecStart=/bin/sleep infinity
Restart=always
[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/kubelet.service "$root/etc/systemd/system/multi-user.target.wants/kubelet.service"
cat >"$root/var/lib/kubelet/config.yaml" <<'EOF'
# kubelet config (test stub): comments and order must survive
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
cgroupDriver: systemd
EOF
KUBELET_CFG_SHA=$(sha256sum <"$root/var/lib/kubelet/config.yaml")

# ---------------------------------------------------------------------------------------------
# Boot, enter, power off.
mkdir "$CG_SD" "$CG_V2" || skip "cannot create cgroups $CG_SD, $CG_V2"
echo $$ >"$CG_SD/cgroup.procs"
echo $$ >"$CG_V2/cgroup.procs"

# ct CMD...: runs CMD in the container (all its namespaces), as `machinectl shell` would.
ct() { nsenter -t "$LEADER" -a "$@"; }
# wait_for SECONDS "what" CMD...: polls CMD every 0.1 s until it succeeds.
wait_for() {
  local secs=$1 what=$2
  shift 2
  local end=$(($(date +%s%N) + secs * 1000000000))
  while [ "$(date +%s%N)" -lt "$end" ]; do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  fail "timed out after ${secs}s waiting for: $what"
}
boot() {
  setsid systemd-nspawn -b -D "$root" --machine="$NAME" --register=no --keep-unit \
    --private-network --console=read-only --bind-ro="$tmp/x:/x" </dev/null >>"$tmp/nspawn.log" 2>&1 &
  NSPAWN=$!
  LEADER=
  local state='' c end=$(($(date +%s) + 60))
  while [ "$(date +%s)" -lt "$end" ]; do
    # The container's init: nspawn's child that runs systemd (an intermediate child comes
    # first and goes).
    if [ -z "$LEADER" ] || [ "$(cat "/proc/$LEADER/comm" 2>/dev/null)" != systemd ]; then
      LEADER=
      for c in $(cat "/proc/$NSPAWN/task/$NSPAWN/children" 2>/dev/null); do
        [ "$(cat "/proc/$c/comm" 2>/dev/null)" = systemd ] && LEADER=$c
      done
      [ -n "$LEADER" ] || { sleep 0.05; continue; }
    fi
    state=$(ct systemctl is-system-running 2>/dev/null) || true
    case "$state" in running | degraded) break ;; esac
    sleep 0.1
  done
  [ -n "$LEADER" ] || { cat "$tmp/nspawn.log" >&2; fail "systemd-nspawn started no container"; }
  [ "$state" = running ] || {
    ct systemctl --failed --no-pager >&2 || true
    fail "the container's systemd is '$state', not running"
  }
}
# Waits for nspawn to exit (the container powered off or rebooted); its exit code in $RC.
nspawn_exit() {
  RC=0
  timeout 60 tail --pid="$NSPAWN" -f /dev/null || fail "systemd-nspawn did not exit within 60 s"
  wait "$NSPAWN" || RC=$?
  NSPAWN='' LEADER=''
}

# A listing of the root with a hash of every file (mode, owner, link target): what an install
# and its uninstall must leave as they found it. Not what changes by itself: journals, /run,
# /tmp, /var/log, /var/cache, /var/lib/systemd and containerd's state.
snapshot() { ct sh /x/snapshot.sh | sort; }
same_as() {  # FILE: the root's snapshot equals FILE
  snapshot >"$tmp/now.lst"
  if ! diff "$1" "$tmp/now.lst" >"$tmp/diff" 2>&1; then
    head -40 "$tmp/diff" >&2
    return 1
  fi
}
prop() { ct systemctl show -P "$2" "$1"; }
rp() { ct /opt/registry-proxy/bin/registry-proxy "$@"; }
# How often the daemon's journal has TEXT so far; journal_has TEXT N: more than N times now.
journal_count() {
  ct journalctl -q --no-pager -u registry-proxy.service | grep -cF -- "$1" || true
}
journal_has() { [ "$(journal_count "$1")" -gt "$2" ]; }

# load_start SECONDS: CLI calls (images) in a loop inside the container for SECONDS; one line
# per failure in $tmp/load.out.
load_start() {
  setsid nsenter -t "$LEADER" -a sh -c '
    end=$(( $(date +%s) + '"$1"' )); n=0
    while [ "$(date +%s)" -lt "$end" ]; do
      n=$((n+1))
      out=$(/opt/registry-proxy/bin/registry-proxy images --timeout 30s 2>&1) || echo "FAILED: $out"
    done
    echo "CALLS $n"' >"$tmp/load.out" 2>&1 &
  LOAD=$!
}
load_check() {  # "what": every call of the load succeeded
  timeout 90 tail --pid="$LOAD" -f /dev/null || fail "$1: the load did not end"
  wait "$LOAD" || true
  LOAD=
  local calls
  calls=$(sed -n 's/^CALLS //p' "$tmp/load.out")
  if grep -q FAILED "$tmp/load.out" || [ -z "$calls" ] || [ "$calls" -lt 2 ]; then
    sort "$tmp/load.out" | uniq -c | head -10 >&2
    fail "$1: CLI calls failed during it"
  fi
  ok "$1: all $calls CLI calls made during it succeeded"
}

log "booting"
boot
log "booted: systemd $(ct systemctl --version | head -1 | cut -d' ' -f2) is running"
check "containerd runs in the container" ct systemctl is-active -q containerd.service
check "kubelet (stub) runs in the container" ct systemctl is-active -q kubelet.service
snapshot >"$tmp/before.lst"

# ---------------------------------------------------------------------------------------------
log "node install --configure-kubelet"
kubelet_pid=$(prop kubelet.service MainPID)
ct /x/v1/opt/registry-proxy/bin/registry-proxy node install --host-root / \
  --config-from /x/config.yaml --configure-kubelet >"$tmp/install.log" 2>&1 ||
  { cat "$tmp/install.log" >&2; fail "node install failed"; }
ok "node install succeeded"
check "registry-proxy.service is active" ct systemctl is-active -q registry-proxy.service
check "registry-proxy.socket is active" ct systemctl is-active -q registry-proxy.socket
check "both units are enabled" ct systemctl is-enabled -q registry-proxy.service registry-proxy.socket
check "the installed binary is bundle v1" \
  test "$(ct sha256sum /opt/registry-proxy/bin/registry-proxy | cut -d' ' -f1)" = "$V1"
check "the config is the one given" ct cmp -s /x/config.yaml /etc/registry-proxy/config.yaml
check "kubelet's config points at the daemon" ct grep -qx \
  'imageServiceEndpoint: unix:///run/registry-proxy/registry-proxy.sock' /var/lib/kubelet/config.yaml
check "kubelet's config kept its comment and other keys" ct grep -qx 'cgroupDriver: systemd' \
  /var/lib/kubelet/config.yaml
check "kubelet's original config is kept as a backup" ct test -f \
  /var/lib/kubelet/config.yaml.registry-proxy.bak
check "kubelet was restarted" test "$(prop kubelet.service MainPID)" != "$kubelet_pid"
check "the CLI answers through the daemon" rp images --timeout 30s
check "the daemon logs to the journal" \
  sh -c "nsenter -t $LEADER -a journalctl -q --no-pager -u registry-proxy | grep -q 'registry-proxy serving'"

pid=$(prop registry-proxy.service MainPID)
kubelet_pid=$(prop kubelet.service MainPID)
ct /x/v1/opt/registry-proxy/bin/registry-proxy node install --host-root / \
  --config-from /x/config.yaml --configure-kubelet >"$tmp/install2.log" 2>&1 ||
  { cat "$tmp/install2.log" >&2; fail "node install (again) failed"; }
check "install again: the daemon was not restarted" test "$(prop registry-proxy.service MainPID)" = "$pid"
check "install again: kubelet was not restarted" test "$(prop kubelet.service MainPID)" = "$kubelet_pid"

# ---------------------------------------------------------------------------------------------
log "reload, restart, socket activation, SIGKILL"
seen=$(journal_count "SIGHUP: reloading")
check "systemctl reload registry-proxy" ct systemctl reload registry-proxy.service
check "reload: same MainPID" test "$(prop registry-proxy.service MainPID)" = "$pid"
wait_for 10 "the reload in the journal" journal_has "SIGHUP: reloading" "$seen"
ok "reload: the daemon logged it"
check "reload: still active" ct systemctl is-active -q registry-proxy.service

load_start 6
sleep 1.5
check "systemctl restart registry-proxy (under load)" ct systemctl restart registry-proxy.service
check "restart: a new MainPID" test "$(prop registry-proxy.service MainPID)" != "$pid"
load_check "restart under a stream of CLI calls"

# 5b: the CLI right after a restart that has not finished (--no-block), and against the
# socket alone (the service stopped: the call starts it).
ct systemctl restart --no-block registry-proxy.service
check "the CLI right after 'systemctl restart --no-block' waits and succeeds" \
  rp images --timeout 30s
ct systemctl stop registry-proxy.service
check "service stopped, socket still listening" ct systemctl is-active -q registry-proxy.socket
check "socket activation: a CLI call starts the daemon and gets its answer" \
  rp images --timeout 30s
check "socket activation: the service is active again" ct systemctl is-active -q registry-proxy.service

pid=$(prop registry-proxy.service MainPID)
ct systemctl kill -s KILL registry-proxy.service
new_pid() { local p; p=$(prop registry-proxy.service MainPID) && [ "$p" != 0 ] && [ "$p" != "$pid" ] &&
  ct systemctl is-active -q registry-proxy.service; }
wait_for 30 "systemd to restart the daemon after SIGKILL" new_pid
ok "SIGKILL: systemd restarted the daemon (pid $pid -> $(prop registry-proxy.service MainPID))"
check "SIGKILL: the CLI answers" rp images --timeout 30s

# ---------------------------------------------------------------------------------------------
log "reboot"
ct systemctl reboot || true
nspawn_exit
check "reboot: systemd-nspawn exited 133 (reboot requested)" test "$RC" = 133
boot
check "reboot: registry-proxy.service is active" ct systemctl is-active -q registry-proxy.service
check "reboot: kubelet is active" ct systemctl is-active -q kubelet.service
rp_up=$(prop registry-proxy.service ActiveEnterTimestampMonotonic)
kubelet_start=$(prop kubelet.service ExecMainStartTimestampMonotonic)
check "reboot: the daemon was ready ($rp_up us) before kubelet started ($kubelet_start us)" \
  test "$rp_up" -gt 0 -a "$rp_up" -le "$kubelet_start"
check "reboot: the CLI answers" rp images --timeout 30s

# ---------------------------------------------------------------------------------------------
log "upgrade v1 -> v2 -> v1 under load"
for v in v2 v1; do
  want=$V1
  [ "$v" = v2 ] && want=$V2
  pid=$(prop registry-proxy.service MainPID)
  load_start 5
  sleep 1
  ct /x/$v/opt/registry-proxy/bin/registry-proxy node install --host-root / \
    --config-from /x/config.yaml --configure-kubelet >"$tmp/up-$v.log" 2>&1 ||
    { cat "$tmp/up-$v.log" >&2; fail "node install of $v failed"; }
  check "to $v: the installed binary is bundle $v" \
    test "$(ct sha256sum /opt/registry-proxy/bin/registry-proxy | cut -d' ' -f1)" = "$want"
  check "to $v: the daemon was restarted" test "$(prop registry-proxy.service MainPID)" != "$pid"
  check "to $v: the running daemon is the new binary" test "$(ct sha256sum \
    "/proc/$(prop registry-proxy.service MainPID)/exe" | cut -d' ' -f1)" = "$want"
  load_check "to $v"
done

# ---------------------------------------------------------------------------------------------
log "node uninstall"
kubelet_pid=$(prop kubelet.service MainPID)
ct /opt/registry-proxy/bin/registry-proxy node uninstall --host-root / >"$tmp/uninstall.log" 2>&1 ||
  { cat "$tmp/uninstall.log" >&2; fail "node uninstall failed"; }
ok "node uninstall succeeded"
check "uninstall: kubelet's config is back byte for byte" \
  test "$(sha256sum <"$root/var/lib/kubelet/config.yaml")" = "$KUBELET_CFG_SHA"
check "uninstall: kubelet was restarted" test "$(prop kubelet.service MainPID)" != "$kubelet_pid"
check "uninstall: the units are gone" test "$(prop registry-proxy.service LoadState)" = not-found
check "uninstall: the socket is gone" ct test ! -e /run/registry-proxy/registry-proxy.sock
check "uninstall: the root is as before the install (files, modes, hashes)" same_as "$tmp/before.lst"

# ---------------------------------------------------------------------------------------------
# The node's pods as shipped, each container in a mount namespace of its own (its filesystem is
# the node's here: the image would bring the same bundle) and, unless its manifest sets hostPID,
# a PID namespace of its own (a child of the node's, as a pod's is); the ConfigMap a directory
# the test changes.
#  - daemonset/node/installer.yaml, init container `install`: privileged, the node's /
#    (recursively: its /proc and /run too) at /mnt/host; systemctl reaches the node's systemd
#    through nsenter -t 1 (hence that pod's hostPID).
#  - daemonset/node/config-sync.yaml, container `sync-config`: no hostPID, uid 0 without
#    capabilities (empty bounding set, no_new_privs), only the node's /etc/registry-proxy and
#    /run/registry-proxy mounted; its readiness probe is `registry-proxy images` on the node's
#    socket.
log "the node's pods: init container (node install --host-root), sync-config"
mkdir -p "$tmp/x/podcfg"
cp "$tmp/x/config.yaml" "$tmp/x/podcfg/config.yaml"
# hostPID (pod-wide) as each manifest says: the node's PID namespace, else one of its own.
pidns_of() {  # MANIFEST
  if grep -qE '^[[:space:]]*hostPID:[[:space:]]*true' "$src/daemonset/node/$1"; then
    echo ""
  else
    echo "-p --fork"
  fi
}
read -ra pidns <<<"$(pidns_of installer.yaml)"
read -ra sync_pidns <<<"$(pidns_of config-sync.yaml)"
hostpid="no hostPID"
[ ${#pidns[@]} -eq 0 ] && hostpid="hostPID"
install_ctr() {  # CMD...: as the privileged init container
  nsenter -t "$LEADER" -m -p -- unshare -m "${pidns[@]}" --propagation private -- sh -c \
    'mount -t tmpfs pod /mnt && mkdir /mnt/host && mount --rbind / /mnt/host &&
     mount -t proc proc /proc && exec "$@"' sh "$@"
}
install_ctr /x/v1/opt/registry-proxy/bin/registry-proxy node install --host-root /mnt/host \
  --config-from /x/podcfg/config.yaml --configure-kubelet >"$tmp/pod-install.log" 2>&1 ||
  { cat "$tmp/pod-install.log" >&2; fail "pod ($hostpid): node install (init container) failed"; }
ok "pod ($hostpid): node install --host-root /mnt/host from its own mount namespace"
check "pod: registry-proxy.service is active" ct systemctl is-active -q registry-proxy.service
check "pod: kubelet points at the daemon" ct grep -qx \
  'imageServiceEndpoint: unix:///run/registry-proxy/registry-proxy.sock' /var/lib/kubelet/config.yaml
check "pod: the installed binary is bundle v1" \
  test "$(ct sha256sum /opt/registry-proxy/bin/registry-proxy | cut -d' ' -f1)" = "$V1"
check "pod: no mount of the init container is left in the node" \
  sh -c "! nsenter -t $LEADER -a grep -q ' /mnt/host' /proc/mounts"

check "config-sync: its pod has no hostPID" test ${#sync_pidns[@]} -gt 0
setsid nsenter -t "$LEADER" -m -p -- unshare -m "${sync_pidns[@]}" --propagation private -- sh -c \
  'mount -t tmpfs pod /mnt && mkdir /mnt/host-etc /mnt/host-run &&
   mount --bind /etc/registry-proxy /mnt/host-etc && mount --bind /run/registry-proxy /mnt/host-run &&
   mount -t proc proc /proc &&
   exec setpriv --bounding-set=-all --inh-caps=-all --no-new-privs "$@"' sh \
  /x/v1/opt/registry-proxy/bin/registry-proxy node sync-config \
  --config-from /x/podcfg/config.yaml --host-config /mnt/host-etc/config.yaml \
  >"$tmp/sync.log" 2>&1 &
WATCH=$!
sync_pid() { pgrep -g "$WATCH" -x registry-proxy; }
wait_for 30 "sync-config to start" sync_pid
SYNC=$(sync_pid)
check "sync-config: no capabilities" \
  sh -c "grep -q '^CapEff:[[:space:]]*0000000000000000' /proc/$SYNC/status"
check "sync-config: readiness probe (images on the node's socket, from its namespaces)" \
  nsenter -t "$SYNC" -m -p -- /x/v1/opt/registry-proxy/bin/registry-proxy images --timeout 5s \
  --endpoint unix:///mnt/host-run/registry-proxy.sock
pid=$(prop registry-proxy.service MainPID)
seen=$(journal_count "applied: generation")
sed 's/^excludeNamespaces: \[/excludeNamespaces: [pod-watch-test, /' "$tmp/x/podcfg/config.yaml" \
  >"$tmp/x/podcfg/new.yaml"
"$bin" check-config "$tmp/x/podcfg/new.yaml" >/dev/null || fail "the changed config does not validate"
mv "$tmp/x/podcfg/new.yaml" "$tmp/x/podcfg/config.yaml"
wait_for 30 "sync-config to copy the changed config to the node" ct grep -q pod-watch-test \
  /etc/registry-proxy/config.yaml
ok "sync-config: copied the changed ConfigMap to the node"
wait_for 30 "the daemon to apply the changed config" journal_has "applied: generation" "$seen"
ok "sync-config: the daemon applied it"
check "sync-config: same MainPID after the config change" \
  test "$(prop registry-proxy.service MainPID)" = "$pid"
kill -TERM "$SYNC"
timeout 20 tail --pid="$WATCH" -f /dev/null || fail "sync-config did not stop on SIGTERM"
rc=0
wait "$WATCH" || rc=$?
WATCH=
check "sync-config: exits 0 on SIGTERM (exit $rc)" test "$rc" = 0
check "pod: the daemon keeps running after the pod stopped" \
  ct systemctl is-active -q registry-proxy.service
install_ctr /x/v1/opt/registry-proxy/bin/registry-proxy node uninstall --host-root /mnt/host \
  >"$tmp/pod-uninstall.log" 2>&1 || { cat "$tmp/pod-uninstall.log" >&2; fail "pod: node uninstall failed"; }
ok "pod: node uninstall --host-root /mnt/host (the uninstaller's init container)"
check "pod: the root is as before the install" same_as "$tmp/before.lst"

# ---------------------------------------------------------------------------------------------
log "the .deb: apt-get install, reinstall, remove, purge"
check "deb: /opt is there and empty before the install" \
  test "$(ct find /opt -mindepth 1 -maxdepth 1 | wc -l)" = 0 -a -d "$root/opt"
apt_get() { ct env DEBIAN_FRONTEND=noninteractive apt-get -y -q -o Dpkg::Use-Pty=0 "$@"; }
apt_get install "$DEB" >"$tmp/apt.log" 2>&1 || { cat "$tmp/apt.log" >&2; fail "apt-get install ./x.deb failed"; }
ok "deb: apt-get install $DEB (offline: Depends libc6 only)"
check "deb: registry-proxy.service is active" ct systemctl is-active -q registry-proxy.service
check "deb: registry-proxy.socket is active" ct systemctl is-active -q registry-proxy.socket
check "deb: the units are enabled" ct systemctl is-enabled -q registry-proxy.service registry-proxy.socket
check "deb: the CLI answers" rp images --timeout 30s
pid=$(prop registry-proxy.service MainPID)
apt_get install --reinstall "$DEB" >"$tmp/apt.log" 2>&1 ||
  { cat "$tmp/apt.log" >&2; fail "apt-get install --reinstall failed"; }
ok "deb: reinstall"
check "deb: reinstall restarted the daemon" test "$(prop registry-proxy.service MainPID)" != "$pid"
check "deb: active after the reinstall" ct systemctl is-active -q registry-proxy.service
check "deb: the CLI answers after the reinstall" rp images --timeout 30s
ct sh -c 'echo "# edited by the operator" >>/etc/registry-proxy/config.yaml'
apt_get remove registry-proxy >"$tmp/apt.log" 2>&1 || { cat "$tmp/apt.log" >&2; fail "apt-get remove failed"; }
ok "deb: remove"
check "deb: remove stopped the daemon" sh -c "! nsenter -t $LEADER -a systemctl is-active -q \
  registry-proxy.service registry-proxy.socket"
check "deb: remove: /opt/registry-proxy is gone" ct test ! -e /opt/registry-proxy
check "deb: remove: the edited config stays" ct grep -q "edited by the operator" \
  /etc/registry-proxy/config.yaml
for d in /opt /etc /lib/systemd/system; do
  check "deb: remove: $d is still there" ct test -d "$d"
done
apt_get purge registry-proxy >"$tmp/apt.log" 2>&1 || { cat "$tmp/apt.log" >&2; fail "apt-get purge failed"; }
ok "deb: purge"
check "deb: purge: the config is gone" ct test ! -e /etc/registry-proxy
for d in /opt /etc /lib/systemd/system; do
  check "deb: purge: $d is still there" ct test -d "$d"
done
check "deb: purge: the root is as before the install" same_as "$tmp/before.lst"

# ---------------------------------------------------------------------------------------------
log "power off"
ct systemctl poweroff || true
nspawn_exit
check "poweroff: systemd-nspawn exited 0" test "$RC" = 0
echo "PASS"
