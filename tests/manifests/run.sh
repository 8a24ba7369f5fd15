#!/usr/bin/env bash
# The offline deployment checks, one ctest entry per mode (label `manifests`):
#
#   tests/manifests/run.sh manifests ROOT [BINARY]   daemonset/, rendered by the real kustomize
#                                                     (kubectl kustomize), against the Kubernetes
#                                                     schemas, and consistency; every other
#                                                     kubectl found renders it identically
#   tests/manifests/run.sh packaging ROOT            the Dockerfile and .github/workflows; CMake
#                                                     configures from the Dockerfile's COPY sources
#   tests/manifests/run.sh selftest ROOT [BINARY]    the checks fail on broken copies
#
# Needs node and npm (Debian 12: `nodejs npm`, which scripts/deps.sh installs for tests). The npm
# packages pinned in package-lock.json (kubernetes-models and friends, ~40 MB) are installed
# once into a cache directory keyed by the lock file's hash: $RP_NPM_CACHE, else
# ~/.cache/registry-proxy/manifests-npm. Without node or npm, or when npm cannot reach its
# registry, it skips (exit 77) with the reason, unless RP_REQUIRE_INTEGRATION=1.
#
# kubectl: $RP_KUBECTL, else `kubectl` on PATH when it is 1.27 or newer, else Debian's own
# kubectl package from trixie, fetched into a cache by scripts/fetch-deb.sh (it never touches
# the system's apt sources).
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
# npm ci that cannot reach its registry fails fast (no retries, 20 s per request, instead of
# minutes), and the failure is remembered for the other modes of the same run (scripts/test.sh
# sets RP_TEST_RUN_ID; without it, for 5 minutes): they skip at once.
failed_mark=$cache/npm-$key.failed
npm_failed_in_this_run() {
  [ -f "$failed_mark" ] && [ ! -f "$cache/$key/.installed" ] || return 1
  if [ -n "${RP_TEST_RUN_ID:-}" ]; then
    [ "$(cat "$failed_mark")" = "$RP_TEST_RUN_ID" ]
  else
    [ -n "$(find "$failed_mark" -mmin -5)" ]
  fi
}
npm_failed_in_this_run &&
  skip "npm could not reach its registry (an earlier attempt in this run failed: $cache/npm-$key.log)"
# One installer at a time (ctest runs the modes in parallel); a finished install is marked.
if ! (
  flock 9
  npm_failed_in_this_run && exit 1  # it failed while we waited for the lock
  if [ ! -f "$cache/$key/.installed" ]; then
    rm -rf "$cache/$key.tmp"
    mkdir -p "$cache/$key.tmp"
    cp "$here/package.json" "$here/package-lock.json" "$cache/$key.tmp/"
    echo "== npm ci into $cache/$key (once)"
    (cd "$cache/$key.tmp" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error \
      --fetch-retries=0 --fetch-timeout=20000) >"$cache/npm-$key.log" 2>&1 || {
      tail -20 "$cache/npm-$key.log" >&2
      echo "${RP_TEST_RUN_ID:-}" >"$failed_mark"
      exit 1
    }
    rm -f "$failed_mark"
    touch "$cache/$key.tmp/.installed"
    rm -rf "${cache:?}/$key"
    mv "$cache/$key.tmp" "$cache/$key"
  fi
) 9>"$cache/.lock"; then
  skip "npm ci of tests/manifests/package-lock.json failed (no npm registry?): $cache/npm-$key.log"
fi
export RP_NODE_MODULES=$modules NODE_PATH=$modules

# A kubectl whose kustomize is what users run (kubectl 1.27 carries kustomize 5.0).
kubectl_minor() { "$1" version --client -o json 2>/dev/null | node -e \
  'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{try{console.log(parseInt(JSON.parse(s).clientVersion.minor))}catch(e){console.log(0)}})'; }
pick_kubectl() {
  if [ -n "${RP_KUBECTL:-}" ]; then echo "$RP_KUBECTL"; return; fi
  if command -v kubectl >/dev/null && [ "$(kubectl_minor kubectl)" -ge 27 ]; then
    command -v kubectl
    return
  fi
  local dir
  dir=$("$root/scripts/fetch-deb.sh" kubectl 1.32) || return 1
  echo "$dir/usr/bin/kubectl"
}
if [ "$mode" != copy-sources ]; then
  RP_KUBECTL=$(pick_kubectl) || skip "no kubectl >= 1.27 and Debian's could not be fetched"
  export RP_KUBECTL
  echo "kustomize: $RP_KUBECTL ($("$RP_KUBECTL" version --client 2>/dev/null | tr '\n' ' '))"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bin_args=()
[ -n "$binary" ] && bin_args=(--binary "$binary")

case "$mode" in
  manifests)
    node "$here/check.js" manifests "$root" "${bin_args[@]}"
    # Every other kubectl on this machine (these dev machines carry 1.27-1.33) renders every
    # variant, byte for byte as the one above.
    mapfile -t dirs < <(cd "$root" && find daemonset -name kustomization.yaml -printf '%h\n' | sort)
    others=()
    for k in /usr/lib/google-cloud-sdk/bin/kubectl.1.* $(command -v kubectl || true); do
      [ -x "$k" ] && [ "$(readlink -f "$k")" != "$(readlink -f "$RP_KUBECTL")" ] && others+=("$k")
    done
    rendered=0
    for d in "${dirs[@]}"; do
      grep -q '^kind: Component' "$root/$d/kustomization.yaml" && continue
      rendered=$((rendered + 1))
      "$RP_KUBECTL" kustomize "$root/$d" >"$tmp/want.yaml"
      for k in "${others[@]}"; do
        if ! "$k" kustomize "$root/$d" >"$tmp/got.yaml" 2>"$tmp/err"; then
          echo "FAIL: $k kustomize $d: $(cat "$tmp/err")" >&2
          exit 1
        fi
        cmp -s "$tmp/want.yaml" "$tmp/got.yaml" ||
          { echo "FAIL: $k kustomize $d renders differently:" >&2; diff "$tmp/want.yaml" "$tmp/got.yaml" >&2; exit 1; }
      done
    done
    echo "rendered $rendered kustomizations with ${#others[@]} other kubectl(s) too: identical"
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
