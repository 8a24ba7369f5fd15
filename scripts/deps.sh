# Installs the Debian 12 packages registry-proxy needs, only those missing.
# Sourced by scripts/run.sh and scripts/test.sh; usage: rp_install_deps build|demo|test
set -euo pipefail

RP_BUILD_PKGS=(cmake ninja-build g++ pkg-config
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libyaml-cpp-dev libspdlog-dev libssl-dev nlohmann-json3-dev libcpp-httplib-dev libnghttp2-dev
  libcurl4-openssl-dev libtomlplusplus-dev libsystemd-dev patchelf)
RP_TEST_PKGS=(libgtest-dev libgmock-dev libbenchmark-dev clang libclang-rt-14-dev
  containerd runc docker-registry umoci skopeo busybox-static openssl curl wrk socat
  systemd systemd-container debootstrap tinyproxy)
# What scripts/run.sh's demo needs on top of the build packages: the test frameworks CMake's
# configure asks for, and what rp-testbed runs (not clang, node, wrk, ...: those are for tests).
RP_DEMO_PKGS=(libgtest-dev libgmock-dev libbenchmark-dev
  containerd runc docker-registry umoci skopeo busybox-static)

rp_install_deps() {
  local want=("${RP_BUILD_PKGS[@]}")
  case "${1:-build}" in
    test) want+=("${RP_TEST_PKGS[@]}") ;;
    demo) want+=("${RP_DEMO_PKGS[@]}") ;;
  esac
  # tests/manifests needs node and npm (Debian's nodejs npm). A node installed otherwise (one
  # that carries its own npm, which Debian's npm package conflicts with) is kept.
  if [ "${1:-build}" = test ] && ! { command -v node && command -v npm; } >/dev/null 2>&1; then
    want+=(nodejs npm)
  fi
  local missing=()
  for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  rp_apt_install "${missing[@]}"
}

# Units enabled (works without a running systemd, e.g. in a chroot) and units running (only
# where systemd runs), one per line, sorted.
rp_units_enabled() {
  command -v systemctl >/dev/null || return 0
  systemctl list-unit-files --state=enabled --no-legend --no-pager 2>/dev/null |
    awk '{print $1}' | sort
}
rp_units_active() {
  [ -d /run/systemd/system ] || return 0
  systemctl list-units --state=active --no-legend --plain --no-pager \
    --type=service,socket,timer,path 2>/dev/null | awk '{print $1}' | sort
}

# apt-get install PKGS..., leaving the host's services as they were: while apt runs, a
# policy-rc.d refuses every service start (invoke-rc.d and deb-systemd-invoke ask it), and
# afterwards any unit the packages enabled (deb-systemd-helper enables containerd.service and
# docker-registry.service) is disabled again, any they started is stopped. What was enabled or
# running before stays so; a policy-rc.d that was there is put back as it was.
rp_apt_install() {
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  local prc=/usr/sbin/policy-rc.d saved=/usr/sbin/policy-rc.d.rp-saved
  local enabled_before active_before n log
  enabled_before=$(rp_units_enabled)
  active_before=$(rp_units_active)
  echo "== installing $# Debian packages (and what they depend on): $*"
  echo "   their services (containerd, docker-registry, ...) are neither started nor enabled"
  "${sudo[@]}" apt-get update -qq
  n=$(apt-get -s install --no-install-recommends "$@" 2>/dev/null | grep -c '^Inst ' || true)
  echo "   $n packages to download and set up: a few minutes on a fresh machine"

  # Restored however we leave: normally, on error, or on Ctrl-C.
  rp_apt_restore() {
    "${sudo[@]}" rm -f "$prc"
    if [ -e "$saved" ] || [ -L "$saved" ]; then "${sudo[@]}" mv -f "$saved" "$prc"; fi
  }
  # (A saved one left by a run that was killed outright is the original: keep it.)
  if [ ! -e "$saved" ] && { [ -e "$prc" ] || [ -L "$prc" ]; }; then
    "${sudo[@]}" mv -f "$prc" "$saved"
  fi
  trap 'rp_apt_restore; exit 130' INT TERM
  trap 'rp_apt_restore' EXIT
  printf '#!/bin/sh\n# scripts/deps.sh: no service starts while it installs packages\nexit 101\n' |
    "${sudo[@]}" tee "$prc" >/dev/null
  "${sudo[@]}" chmod 755 "$prc"
  log=$(mktemp /tmp/rp-apt-install.XXXXXX)
  local rc=0
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    "$@" 2>&1 | tee "$log" | awk -v n="$n" '
      BEGIN { step = n >= 10 ? int(n / 10) : 1 }
      /^Get:/ { g++; if (g % step == 0) { printf "   downloaded %d of %d\n", g, n; fflush() } }
      /^Setting up / { s++; if (s % step == 0 || s == n) { printf "   set up %d of %d\n", s, n; fflush() } }' ||
    rc=$?
  rp_apt_restore
  trap - EXIT INT TERM
  if [ "$rc" -ne 0 ]; then
    tail -30 "$log" >&2
    echo "apt-get install failed (exit $rc); its output: $log" >&2
    return "$rc"
  fi
  rm -f "$log"
  local u
  for u in $(comm -13 <(echo "$enabled_before") <(rp_units_enabled)); do
    echo "   disabling $u (enabled by its package; it was not before)"
    "${sudo[@]}" systemctl disable --quiet "$u" || true
  done
  for u in $(comm -13 <(echo "$active_before") <(rp_units_active)); do
    echo "   stopping $u (started by its package; it was not running before)"
    "${sudo[@]}" systemctl stop "$u" || true
  done
}

# Configures (once) and builds a tree: everything, or only TARGETs (and what they need).
# rp_build DIR [cmake args...] [-- TARGET...]
rp_build() {
  local dir=$1 args=() targets=()
  shift
  while [ $# -gt 0 ] && [ "$1" != -- ]; do args+=("$1"); shift; done
  [ $# -gt 0 ] && shift && targets=("$@")
  if [ ! -f "$dir/build.ninja" ]; then
    echo "== configuring $dir (cmake)"
    cmake -S "$RP_ROOT" -B "$dir" -G Ninja -DRP_WERROR="${RP_WERROR:-OFF}" "${args[@]}" >/dev/null
  fi
  local steps what=${targets[*]:-everything}
  steps=$(ninja -C "$dir" -n "${targets[@]}" 2>/dev/null | grep -c '^\[' || true)
  if [ "$steps" -gt 0 ]; then
    echo "== building $what in $dir: $steps steps (${RP_BUILD_ESTIMATE:-the first time takes a while})"
  fi
  cmake --build "$dir" -j "${RP_JOBS:-2}" ${targets[@]:+--target "${targets[@]}"}
}
