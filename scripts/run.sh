#!/usr/bin/env bash
# Builds registry-proxy (installing what is missing on Debian 12) and runs it.
#
#   scripts/run.sh                 # a short demo: resolve and check-config on the default config
#   scripts/run.sh COMMAND ARGS... # any subcommand, e.g. scripts/run.sh resolve nginx -n default
set -euo pipefail
RP_ROOT=$(cd "$(dirname "$0")/.." && pwd)
source "$RP_ROOT/scripts/deps.sh"
BUILD=${RP_BUILD_DIR:-$RP_ROOT/build}

rp_install_deps build
rp_build "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo >&2
bin="$BUILD/daemon/registry-proxy"

if [ $# -gt 0 ]; then
  exec "$bin" "$@"
fi

say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
say registry-proxy check-config config/config.yaml
"$bin" check-config "$RP_ROOT/config/config.yaml"
say registry-proxy resolve nginx --namespace default
"$bin" resolve nginx --namespace default
say registry-proxy resolve nginx --namespace kube-system
"$bin" resolve nginx --namespace kube-system
say registry-proxy resolve registry.k8s.io/pause:3.9@sha256:... --json
"$bin" resolve --json -n default \
  "registry.k8s.io/pause:3.9@sha256:7031c1b283388d2c2e09b57badb803c05ebed362dc88d84b480cc47f72a21097"
say "registry-proxy resolve sha256:<id>  (ids are never rewritten)"
"$bin" resolve -n default sha256:7031c1b283388d2c2e09b57badb803c05ebed362dc88d84b480cc47f72a21097
