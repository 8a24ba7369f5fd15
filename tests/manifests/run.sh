#!/usr/bin/env bash
# The offline deployment checks, one ctest entry per mode (label `manifests`):
#
#   tests/manifests/run.sh manifests ROOT [BINARY]   daemonset/ (and the overlay that
#                                                     scripts/webhook-cert.sh writes) against the
#                                                     Kubernetes schemas, and consistency
#   tests/manifests/run.sh packaging ROOT            the Dockerfile and .github/workflows; CMake
#                                                     configures from the Dockerfile's COPY sources
#   tests/manifests/run.sh selftest ROOT [BINARY]    the checks fail on broken copies
#
# Needs node and npm (Debian 12: `nodejs npm`, which scripts/deps.sh installs for tests). The npm
# packages pinned in package-lock.json (kubernetes-models and friends, ~40 MB) are installed
# once into a cache directory keyed by the lock file's hash: $RP_NPM_CACHE, else
# ~/.cache/registry-proxy/manifests-npm. Without node or npm, or when npm cannot reach its
# registry, it skips (exit 77) with the reason, unless RP_REQUIRE_INTEGRATION=1.
set -euo pipefail

mode=${1:?usage: run.sh manifests|packaging|selftest ROOT [BINARY]}
root=$(cd "${2:?ROOT}" && pwd)
binary=${3:-}
here=$(cd "$(dirname "$0")" && pwd)

skip() {
  if [ "${RP_REQUIRE_INTEGRATION:-0}" = 1 ]; then
    echo "FAIL (RP_REQUIRE_INTEGRATION=1): $*" >&2
    exit 1
  fi
  echo "SKIP: $*"
  exit 77
}

command -v node >/dev/null || skip "node is not installed (apt-get install nodejs npm)"
command -v npm >/dev/null || skip "npm is not installed (apt-get install npm)"
major=$(node -p 'process.versions.node.split(".")[0]')
[ "$major" -ge 14 ] || skip "node $(node --version) is too old (14 or newer)"

cache=${RP_NPM_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/registry-proxy/manifests-npm}
key=$(cat "$here/package.json" "$here/package-lock.json" | sha256sum | cut -c1-16)
modules=$cache/$key/node_modules
mkdir -p "$cache"
# One installer at a time (ctest runs the modes in parallel); a finished install is marked.
if ! (
  flock 9
  if [ ! -f "$cache/$key/.installed" ]; then
    rm -rf "$cache/$key.tmp"
    mkdir -p "$cache/$key.tmp"
    cp "$here/package.json" "$here/package-lock.json" "$cache/$key.tmp/"
    echo "== npm ci into $cache/$key (once)"
    (cd "$cache/$key.tmp" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error) \
      >"$cache/npm-$key.log" 2>&1 || { cat "$cache/npm-$key.log" >&2; exit 1; }
    touch "$cache/$key.tmp/.installed"
    rm -rf "${cache:?}/$key"
    mv "$cache/$key.tmp" "$cache/$key"
  fi
) 9>"$cache/.lock"; then
  skip "npm ci of tests/manifests/package-lock.json failed (no npm registry?): see above"
fi
export RP_NODE_MODULES=$modules NODE_PATH=$modules

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bin_args=()
[ -n "$binary" ] && bin_args=(--binary "$binary")

case "$mode" in
  manifests)
    # The overlay scripts/webhook-cert.sh writes (node daemon + webhook, openssl-made CA).
    command -v openssl >/dev/null || skip "openssl is not installed"
    bash "$root/scripts/webhook-cert.sh" "$tmp/openssl-overlay" >/dev/null 2>"$tmp/cert.log" ||
      { cat "$tmp/cert.log" >&2; exit 1; }
    node "$here/check.js" manifests "$root" --overlay "$tmp/openssl-overlay" "${bin_args[@]}"
    ;;
  packaging)
    node "$here/check.js" packaging "$root"
    # The build stage configures CMake from just what the Dockerfile copies in.
    command -v cmake >/dev/null || skip "cmake is not installed"
    mkdir -p "$tmp/context"
    while read -r src; do
      if [ -d "$root/$src" ]; then  # COPY DIR DEST copies DIR's contents into DEST
        mkdir -p "$tmp/context/$src"
        cp -a "$root/$src/." "$tmp/context/$src/"
      else
        mkdir -p "$tmp/context/$(dirname "$src")"
        cp -a "$root/$src" "$tmp/context/$src"
      fi
    done < <(node "$here/check.js" copy-sources "$root")
    if ! cmake -S "$tmp/context" -B "$tmp/build" -G Ninja -DRP_BUILD_TESTS=OFF \
      -DRP_BUILD_BENCH=OFF >"$tmp/cmake.log" 2>&1; then
      cat "$tmp/cmake.log" >&2
      echo "FAIL: CMake does not configure from the Dockerfile's COPY sources alone" >&2
      exit 1
    fi
    echo "CMake configures from the Dockerfile's COPY sources alone"
    ;;
  selftest)
    node "$here/selftest.js" "$root" "$tmp" "$binary"
    ;;
  *)
    echo "unknown mode $mode" >&2
    exit 2
    ;;
esac
