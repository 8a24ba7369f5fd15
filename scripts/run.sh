#!/usr/bin/env bash
# Builds registry-proxy (installing what is missing on Debian 12) and runs the daemon.
#
#   scripts/run.sh                 # the daemon: in front of the node's containerd if there is
#                                  # one, else a self-contained demo (see README)
#   RP_DEMO=1 scripts/run.sh       # the demo even on a node
#   scripts/run.sh COMMAND ARGS... # any subcommand, e.g. scripts/run.sh resolve nginx -n default
set -euo pipefail
RP_ROOT=$(cd "$(dirname "$0")/.." && pwd)
source "$RP_ROOT/scripts/deps.sh"
BUILD=${RP_BUILD_DIR:-$RP_ROOT/build}
NODE_CONTAINERD=/run/containerd/containerd.sock

bin="$BUILD/daemon/registry-proxy"
# Without arguments (the daemon on a node, or the demo with its private containerd) this needs
# root: say so before installing or building anything. A subcommand (scripts/run.sh resolve
# ...) runs as any user.
if [ $# -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
  echo "scripts/run.sh: run as root or with sudo (the daemon and the demo's private containerd" >&2
  echo "need root); a subcommand runs as any user, e.g. scripts/run.sh resolve nginx -n default" >&2
  exit 1
fi
if [ $# -gt 0 ]; then
  rp_install_deps build >&2
  RP_BUILD_ESTIMATE="first time: about 4-8 min on 2 cores" \
    rp_build "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo -- registry-proxy >&2
  exec "$bin" "$@"
fi

node_has_containerd() {
  [ -S "$NODE_CONTAINERD" ] || return 1
  rp_install_deps build
  RP_BUILD_ESTIMATE="first time: about 4-8 min on 2 cores" \
    rp_build "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo -- registry-proxy
  "$bin" images --endpoint "unix://$NODE_CONTAINERD" >/dev/null 2>&1  # containerd answers
}

# --- On a node: the daemon in front of the node's containerd ---------------------------------
if [ "${RP_DEMO:-0}" != "1" ] && node_has_containerd; then
  config=/etc/registry-proxy/config.yaml
  [ -f "$config" ] || config="$RP_ROOT/config/config.yaml"
  echo "== registry-proxy serve in front of $NODE_CONTAINERD (config $config)"
  echo "   point kubelet (imageServiceEndpoint) or crictl (--image-endpoint) at"
  echo "   unix:///run/registry-proxy/registry-proxy.sock; Ctrl-C stops it"
  exec "$bin" serve --config "$config"
fi

# --- No containerd here: the demo ------------------------------------------------------------
rp_install_deps demo  # containerd, docker-registry, umoci, skopeo, busybox-static, ...
# Only the daemon and the testbed, not the tests and benchmarks (scripts/test.sh builds those).
RP_BUILD_ESTIMATE="first time: about 4-8 min on 2 cores" \
  rp_build "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo -- registry-proxy rp-testbed
testbed="$BUILD/tests/integration/rp-testbed"
work=$(mktemp -d /tmp/registry-proxy-demo.XXXXXX)
tb_pid="" daemon_pid=""
cleanup() {
  trap - EXIT INT TERM
  set +e  # a child's non-zero exit must not cut the cleanup short
  for pid in $daemon_pid $tb_pid; do  # daemon first: it is in front of containerd
    kill -TERM "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  rm -rf "$work"
  echo "== cleaned up"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Headings in bold on a terminal only: no raw escape codes in a log or a pipe.
if [ -t 1 ]; then
  say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
else
  say() { printf '\n== %s\n' "$*"; }
fi
say "starting a throwaway containerd, an empty \"upstream\" registry (containerd reaches it as docker.io) and a \"mirror\" registry holding library/busybox"
"$testbed" up --mirror-only --env "$work/testbed.env" > "$work/testbed.json" 2> "$work/testbed.log" &
tb_pid=$!
for _ in $(seq 1 600); do
  [ -f "$work/testbed.env" ] && break
  kill -0 "$tb_pid" 2>/dev/null || { cat "$work/testbed.log" >&2; exit 1; }
  sleep 0.1
done
[ -f "$work/testbed.env" ] || { echo "testbed did not start" >&2; exit 1; }
source "$work/testbed.env"
echo "containerd: $RP_TB_CONTAINERD"
echo "upstream:   $RP_TB_UPSTREAM (as $RP_TB_UPSTREAM_AS; empty)"
echo "mirror:     $RP_TB_MIRROR"

cat > "$work/config.yaml" <<EOF
# The shipped default, with the demo's local mirror for docker.io.
proxies:
  docker.io: $RP_TB_MIRROR
excludeNamespaces: [kube-system, kube-public, kube-node-lease, registry-proxy]
includeNamespaces: ["*"]
EOF
socket="$work/registry-proxy.sock"
say "registry-proxy serve --config $work/config.yaml --listen unix://$socket --upstream $RP_TB_CONTAINERD"
"$bin" serve --config "$work/config.yaml" --listen "unix://$socket" \
  --upstream "$RP_TB_CONTAINERD" > "$work/daemon.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 1 100); do [ -S "$socket" ] && break; sleep 0.05; done
[ -S "$socket" ] || { cat "$work/daemon.log" >&2; exit 1; }

say "the decision for busybox in namespace default"
"$bin" resolve busybox --namespace default --config "$work/config.yaml"

say "registry-proxy pull busybox --namespace default   (through the daemon)"
"$bin" pull busybox --namespace default --endpoint "unix://$socket"

say "who served it: manifest requests from containerd in each registry's access log"
for r in mirror upstream; do
  log=$RP_TB_MIRROR_LOG
  [ "$r" = upstream ] && log=$RP_TB_UPSTREAM_LOG
  n=$( (grep '^[0-9.]* - - .*/manifests/' "$log" | grep -c 'containerd/') || true)
  echo "$r: $n"
  (grep '^[0-9.]* - - .*/manifests/' "$log" | grep 'containerd/' | sed 's/^/    /') || true
done

say "what the node has now (straight from containerd): only upstream names"
"$bin" images --endpoint "$RP_TB_CONTAINERD"

say "the daemon's log"
sed 's/^/  /' "$work/daemon.log"

say "the daemon keeps serving unix://$socket; Ctrl-C stops it and cleans up"
echo "try: $bin pull busybox:latest --namespace kube-system --endpoint unix://$socket"
echo "     (an excluded namespace: goes to the empty upstream and fails with its error)"
wait "$daemon_pid"
