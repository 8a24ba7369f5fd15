#!/usr/bin/env bash
# Makes the registry-proxy binary self-contained for a host:
#
#   scripts/bundle.sh BINARY OUT     ->  OUT/opt/registry-proxy/bin/registry-proxy
#                                        OUT/opt/registry-proxy/lib/<every non-glibc library>
#
# What a host is assumed to have: glibc (libc, libm, libpthread, libdl, librt, the dynamic
# loader), at least the version the binary was built against (Debian 12: glibc 2.36; the
# newest symbol version used is printed). Everything else, libstdc++ and libgcc_s included, is
# copied into lib/, and the binary's RUNPATH is $ORIGIN/../lib, each library's $ORIGIN, so
# the bundle works wherever it is copied and never picks a host's gRPC/absl/protobuf/OpenSSL.
# Debug info is stripped (RP_BUNDLE_STRIP=0 keeps it).
#
# Why not static: Debian 12 ships no static spdlog or fmt, and gRPC's CMake package exports
# only the shared libraries; mixing a static protobuf with the shared gRPC that links it would
# put two copies of protobuf in the process.
set -euo pipefail

die() { echo "bundle.sh: $*" >&2; exit 1; }
[ $# -eq 2 ] || die "usage: bundle.sh BINARY OUT"
bin=$1
out=$2
[ -x "$bin" ] || die "$bin is not an executable"
command -v patchelf >/dev/null || die "patchelf is missing (apt-get install patchelf)"

# The libraries a host provides: glibc's own.
is_glibc() {
  case "$1" in
    linux-vdso.so.* | ld-linux*.so.* | libc.so.* | libm.so.* | libpthread.so.* | libdl.so.* | \
      librt.so.* | libresolv.so.* | libutil.so.* | libanl.so.* | libmvec.so.*) return 0 ;;
  esac
  return 1
}

root=$out/opt/registry-proxy
rm -rf "$root"
mkdir -p "$root/bin" "$root/lib"
install -m 0755 "$bin" "$root/bin/registry-proxy"

# ldd resolves the whole closure (transitive dependencies included) as the build host sees it.
count=0
bundle_closure() {  # ELF: copies it (unless it is the binary) and every library it needs
  local ldd_out name arrow path
  ldd_out=$(ldd "$1") || die "ldd $1 failed"
  while read -r name arrow path _; do
    [ "$arrow" = "=>" ] || continue
    is_glibc "$name" && continue
    [ -n "$path" ] && [ -f "$path" ] || die "$name: not found on this machine ($arrow $path)"
    [ -f "$root/lib/$name" ] && continue
    install -m 0644 "$(readlink -f "$path")" "$root/lib/$name"
    count=$((count + 1))
  done <<<"$ldd_out"
}
bundle_closure "$bin"
# Loaded on first use with dlopen (ldd cannot see them): libcurl, by the first mirror probe
# (daemon/src/pull/curl_lib.h). Found as the dynamic loader would find them.
for soname in libcurl.so.4; do
  # (awk reads all of ldconfig's output: an early exit would SIGPIPE it, failing under pipefail)
  path=$(/sbin/ldconfig -p | awk -v n="$soname" '$1 == n && !p {p = $NF} END {print p}')
  [ -n "$path" ] && [ -f "$path" ] || die "$soname (loaded on demand) is not installed here"
  install -m 0644 "$(readlink -f "$path")" "$root/lib/$soname"
  count=$((count + 1))
  bundle_closure "$path"
done

if [ "${RP_BUNDLE_STRIP:-1}" = 1 ]; then
  strip --strip-debug "$root/bin/registry-proxy" "$root"/lib/*.so*
fi
patchelf --set-rpath '$ORIGIN/../lib' "$root/bin/registry-proxy"
for l in "$root"/lib/*.so*; do
  patchelf --set-rpath '$ORIGIN' "$l"
done

glibc=$(objdump -T "$root/bin/registry-proxy" "$root"/lib/*.so* 2>/dev/null |
  grep -o 'GLIBC_[0-9][0-9.]*' | sort -Vu | tail -1)
echo "bundled $root: $count libraries; needs ${glibc:-GLIBC_?} or newer on the host"
