#!/bin/bash
# scripts/run.sh on a fresh Debian 12 with systemd, as a new user meets it (issue 15). A manual
# check, not in CTest: it needs root, the network (apt-get, ~125 packages) and the cached
# Debian 12 root that tests/system/nspawn_test.sh makes (~/.cache/registry-proxy/nspawn-root-*.tar).
#
# Phase A (not booted, host network): containerd and runc purged (a machine without them), then
# scripts/deps.sh's `demo` install. Phase B (booted with systemd, private network, this tree
# mounted at /work/main with a throwaway overlay): the packages' units neither enabled nor
# running; as non-root, run.sh refuses at once; the demo twice, each ended by Ctrl-C (SIGINT to
# the group): the second is the demo again, nothing is left in /tmp, no port listening, no
# process left. Prints FAIL lines and exits 1 if any check fails.
#
#   sudo tests/install/two_commands_nspawn.sh     # from /work/main (the tree is bind-mounted)
set -uo pipefail
SRC=$(cd "$(dirname "$0")/../.." && pwd)
TARBALL=$(ls -t "${RP_NSPAWN_CACHE:-$HOME/.cache/registry-proxy}"/nspawn-root-*.tar 2>/dev/null | head -1)
[ -n "$TARBALL" ] || { echo "no cached root: run tests/system/nspawn_test.sh once"; exit 77; }
T=/tmp/rp-e2e.$$
NAME=rp-e2e-$$
CG_SD=/sys/fs/cgroup/systemd/$NAME CG_V2=/sys/fs/cgroup/unified/$NAME
orig_sd=$(sed -n 's/^[0-9]*:name=systemd://p' /proc/$$/cgroup)
orig_v2=$(sed -n 's/^0:://p' /proc/$$/cgroup)
NSPAWN= LEADER=
cleanup() {
  if [ -n "$NSPAWN" ] && kill -0 "$NSPAWN" 2>/dev/null; then
    [ -n "$LEADER" ] && timeout 10 nsenter -t "$LEADER" -a systemctl poweroff 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$NSPAWN" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$NSPAWN" 2>/dev/null; wait "$NSPAWN" 2>/dev/null
  fi
  for d in "$CG_SD" "$CG_V2"; do
    [ -d "$d" ] || continue
    for p in $(cat $(find "$d" -name cgroup.procs) 2>/dev/null); do [ "$p" != $$ ] && kill -KILL "$p" 2>/dev/null; done
  done
  echo $$ >"/sys/fs/cgroup/systemd${orig_sd}/cgroup.procs" 2>/dev/null
  echo $$ >"/sys/fs/cgroup/unified${orig_v2}/cgroup.procs" 2>/dev/null
  for d in "$CG_SD" "$CG_V2"; do
    for _ in $(seq 1 50); do find "$d" -depth -type d -exec rmdir {} + 2>/dev/null; [ -d "$d" ] || break; sleep 0.1; done
  done
  rm -rf "/run/systemd/nspawn/propagate/$NAME" "/run/systemd/nspawn/propagate/root" 2>/dev/null
  grep -o " ${T}[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m"; done
  rm -rf "$T"
}
trap cleanup EXIT
mkdir -p $T/root $T/upper
tar -xf "$TARBALL" -C $T/root || exit 1
cp /etc/resolv.conf $T/root/etc/resolv.conf
echo "deb http://deb.debian.org/debian bookworm main" > $T/root/etc/apt/sources.list
mkdir -p $T/root/work/main
cp "$SRC/scripts/deps.sh" $T/root/deps.sh
echo "== phase A: purge containerd runc; rp_install_deps demo"
systemd-nspawn -q -D $T/root --register=no --keep-unit --machine=$NAME bash -c '
  DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq containerd runc >/dev/null 2>&1
  echo "before: containerd enabled=$(systemctl is-enabled containerd 2>&1 | tail -1)"
  RP_ROOT=/; source /deps.sh; rp_install_deps demo 2>&1 | grep -v "^   \(downloaded\|set up\)"' 
cat > $T/root/check.sh <<'EOC'
#!/bin/bash
cd /work/main
rc=0
fail() { echo "FAIL: $*"; rc=1; }
secs() { awk -v s="$1" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }
units() {
  for u in containerd docker-registry; do
    echo "$1: $u $(systemctl is-enabled $u 2>&1), $(systemctl is-active $u 2>&1)"
    systemctl is-enabled -q $u && fail "$u enabled"
    systemctl is-active -q $u && fail "$u running"
  done
}
units "after the install"
[ "$(ss -Hltn | wc -l)" -eq 0 ] || fail "ports listening before the demo: $(ss -Hltn)"
start=$(date +%s.%N)
su nobody -s /bin/bash -c '/work/main/scripts/run.sh' && fail "run.sh as nobody succeeded"
echo "as nobody: refused after $(secs "$start") s"
for run in 1 2; do
  log=/root/demo$run.log
  start=$(date +%s.%N)
  setsid scripts/run.sh > $log 2>&1 &
  pid=$!
  first=""
  for _ in $(seq 1 6000); do
    [ -z "$first" ] && grep -q '^decision:' $log && first=$(secs "$start")
    grep -q "Ctrl-C stops it" $log && break
    kill -0 $pid 2>/dev/null || break
    sleep 0.1
  done
  grep "^== building" $log
  grep -q "Ctrl-C stops it" $log || { fail "demo $run did not come up"; tail -20 $log; }
  grep -q 'serve in front of /run/containerd' $log && fail "demo $run: node mode"
  echo "demo $run: first result after ${first:-?} s, complete after $(secs "$start") s; $(grep -m1 '^mirror: ' $log)"
  kill -INT -- -$pid; wait $pid; echo "  run.sh exit $? after Ctrl-C"; sleep 1
  left=$(ls -d /tmp/rp-testbed.* /tmp/rp-testimage.* /tmp/registry-proxy-demo.* 2>/dev/null)
  [ -z "$left" ] || fail "left in /tmp: $left"
  [ "$(ss -Hltn | wc -l)" -eq 0 ] || fail "ports listening after Ctrl-C: $(ss -Hltn)"
  procs=$(ps -e -o comm= | grep -E '^(containerd|docker-registry|registry-proxy|rp-testbed|runc)' || true)
  [ -z "$procs" ] || fail "processes left: $procs"
done
units "after two demos"
[ "$rc" -eq 0 ] && echo "all checks passed"
exit $rc
EOC
chmod +x $T/root/check.sh
echo "== phase B: boot"
mkdir "$CG_SD" "$CG_V2"; echo $$ >"$CG_SD/cgroup.procs"; echo $$ >"$CG_V2/cgroup.procs"
ct() { nsenter -t "$LEADER" -a "$@"; }
setsid systemd-nspawn -b -D $T/root --machine=$NAME --register=no --keep-unit --private-network \
  --console=read-only --overlay="$SRC:$T/upper:/work/main" </dev/null >$T/nspawn.log 2>&1 &
NSPAWN=$!
end=$(($(date +%s) + 60))
while [ "$(date +%s)" -lt "$end" ]; do
  if [ -z "$LEADER" ] || [ "$(cat /proc/$LEADER/comm 2>/dev/null)" != systemd ]; then
    LEADER=
    for c in $(cat /proc/$NSPAWN/task/$NSPAWN/children 2>/dev/null); do [ "$(cat /proc/$c/comm 2>/dev/null)" = systemd ] && LEADER=$c; done
    [ -n "$LEADER" ] || { sleep 0.1; continue; }
  fi
  state=$(ct systemctl is-system-running 2>/dev/null); case "$state" in running|degraded) break;; esac
  sleep 0.2
done
echo "container: $state"
[ -n "$LEADER" ] || { cat $T/nspawn.log; exit 1; }
ct /check.sh
