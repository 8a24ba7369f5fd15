# Installs the Debian 12 packages registry-proxy needs, only those missing.
# Sourced by scripts/run.sh and scripts/test.sh; usage: rp_install_deps build|test|run
set -euo pipefail

RP_BUILD_PKGS=(cmake ninja-build g++ pkg-config
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libyaml-cpp-dev libspdlog-dev libssl-dev nlohmann-json3-dev libcpp-httplib-dev libnghttp2-dev
  patchelf)
RP_TEST_PKGS=(libgtest-dev libgmock-dev libbenchmark-dev clang libclang-rt-14-dev
  containerd runc docker-registry umoci skopeo busybox-static openssl curl wrk socat
  systemd systemd-container debootstrap)

rp_install_deps() {
  local want=("${RP_BUILD_PKGS[@]}")
  case "${1:-build}" in
    test) want+=("${RP_TEST_PKGS[@]}") ;;
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
  echo "== installing: ${missing[*]}"
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
}

# Configures (once) and builds a tree. rp_build DIR [cmake args...]
rp_build() {
  local dir=$1
  shift
  if [ ! -f "$dir/build.ninja" ]; then
    cmake -S "$RP_ROOT" -B "$dir" -G Ninja -DRP_WERROR="${RP_WERROR:-OFF}" "$@" >/dev/null
  fi
  cmake --build "$dir" -j "${RP_JOBS:-2}"
}
