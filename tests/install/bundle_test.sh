#!/usr/bin/env bash
# The bundled binary runs on a host that has glibc and nothing else of ours: bundles BINARY
# with scripts/bundle.sh, then
#  1. every library it loads outside glibc resolves inside the bundle (ldd), and so does
#     libcurl, which it loads on the first probe;
#  2. in a chroot holding only glibc and the bundle (no libstdc++, no protobuf, no OpenSSL...):
#     --version, check-config (good and bad file, the error keeps line:column), and `serve`
#     answering a CRI call on its socket (the relay and the CLI client really work), stopped by PID with SIGTERM.
# Usage: bundle_test.sh BUNDLE_SH BINARY CONFIG_YAML
set -euo pipefail
bundle_sh=$1 bin=$2 config=$3

fail() { echo "FAIL: $*" >&2; exit 1; }
tmp=$(mktemp -d /tmp/rp-bundle-test.XXXXXX)
daemon_pid=
cleanup() {
  if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then
    kill -KILL "$daemon_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

"$bundle_sh" "$bin" "$tmp/dist"
b=$tmp/dist/opt/registry-proxy
[ -x "$b/bin/registry-proxy" ] || fail "no binary in the bundle"
[ "$(patchelf --print-rpath "$b/bin/registry-proxy")" = '$ORIGIN/../lib' ] ||
  fail "RUNPATH is $(patchelf --print-rpath "$b/bin/registry-proxy")"

# 1. ldd: everything but glibc comes from the bundle.
outside() {  # ELF: the libraries it loads from outside the bundle (glibc aside)
  ldd "$1" | awk -v lib="$b/lib/" '
    $2 == "=>" { gsub("/bin/[.][.]/", "/", $3) }
    $2 == "=>" && $1 !~ /^(libc|libm|libpthread|libdl|librt|libresolv)\.so/ && index($3, lib) != 1 { print }
    /not found/ { print }'
}
bad=$(outside "$b/bin/registry-proxy")
[ -z "$bad" ] || fail "libraries outside the bundle:"$'\n'"$bad"
# libcurl is loaded by the first mirror probe (dlopen), so ldd of the binary does not list it.
[ -f "$b/lib/libcurl.so.4" ] || fail "libcurl.so.4 (loaded on the first probe) is not bundled"
! ldd "$b/bin/registry-proxy" | grep -q libcurl || fail "the binary links libcurl at start"
bad=$(outside "$b/lib/libcurl.so.4")
[ -z "$bad" ] || fail "libcurl's libraries outside the bundle:"$'\n'"$bad"
nlibs=$(ls "$b/lib" | wc -l)
[ "$nlibs" -gt 10 ] || fail "only $nlibs libraries bundled"
ls "$b/lib" | grep -q '^libstdc++' || fail "libstdc++ not bundled"
echo "ldd: $nlibs bundled libraries, all resolved inside the bundle"

# 2. A root with glibc only.
root=$tmp/root
mkdir -p "$root/lib64" "$root/lib/x86_64-linux-gnu" "$root/etc/registry-proxy" "$root/run" \
  "$root/tmp" "$root/opt" "$root/proc"
cp -a "$tmp/dist/opt/registry-proxy" "$root/opt/"
cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
# (libresolv is glibc too: Debian's libcurl needs it through Kerberos and LDAP.)
for l in libc.so.6 libm.so.6 libpthread.so.0 libdl.so.2 librt.so.1 libresolv.so.2; do
  cp -L "/lib/x86_64-linux-gnu/$l" "$root/lib/x86_64-linux-gnu/"
done
[ ! -e "$root/lib/x86_64-linux-gnu/libstdc++.so.6" ] || fail "libstdc++ leaked into the root"
rp=/opt/registry-proxy/bin/registry-proxy
# Runs a command in the root, with /proc as every host has it (the loader reads
# /proc/self/exe to expand $ORIGIN) mounted in a private mount namespace: gone when the
# command exits, so the test leaves no mount behind. exec: the PID is the command's.
in_root() {
  unshare --mount --propagation private -- /bin/sh -c \
    'mount -t proc proc "$0/proc" && exec chroot "$0" "$@"' "$root" "$@"
}

v=$(in_root "$rp" --version) || fail "--version failed in the chroot"
[[ "$v" == "registry-proxy "* ]] || fail "--version printed '$v'"
echo "chroot --version: $v"

cp "$config" "$root/etc/registry-proxy/config.yaml"
in_root "$rp" check-config /etc/registry-proxy/config.yaml ||
  fail "check-config of the shipped config failed in the chroot"
printf 'enabled: true\nproxies:\n  docker.io: [not, a, host]\n' >"$root/etc/registry-proxy/bad.yaml"
if out=$(in_root "$rp" check-config /etc/registry-proxy/bad.yaml 2>&1); then
  fail "check-config accepted a bad config"
fi
[[ "$out" == *"/etc/registry-proxy/bad.yaml:3:"* ]] || fail "bad config error lacks line: $out"
echo "chroot check-config: good ok, bad rejected ($out)"

# serve: the CRI relay from the bundled libraries. Its upstream (containerd) is absent,
# so the call comes back UNAVAILABLE from the daemon's own upstream channel.
unshare --mount --propagation private -- /bin/sh -c \
  'mount -t proc proc "$0/proc" && exec chroot "$0" "$@"' "$root" "$rp" serve --config /etc/registry-proxy/config.yaml \
  --listen unix:///run/rp/rp.sock --upstream unix:///run/no-containerd.sock --grace 1 \
  2>"$tmp/serve.log" &
daemon_pid=$!  # unshare, which execs sh, which execs chroot, which execs the daemon
for _ in $(seq 1 200); do
  [ -S "$root/run/rp/rp.sock" ] && break
  kill -0 "$daemon_pid" 2>/dev/null || { cat "$tmp/serve.log" >&2; fail "serve exited"; }
  sleep 0.05
done
[ -S "$root/run/rp/rp.sock" ] || { cat "$tmp/serve.log" >&2; fail "serve made no socket"; }
if out=$(in_root "$rp" images --endpoint unix:///run/rp/rp.sock 2>&1); then
  fail "images succeeded without containerd: $out"
fi
[[ "$out" == *UNAVAILABLE* ]] || fail "images through the bundled daemon: $out"
echo "chroot serve: answered a CRI call ($out)"
kill -TERM "$daemon_pid"
rc=0
wait "$daemon_pid" || rc=$?
daemon_pid=
[ "$rc" -eq 0 ] || { cat "$tmp/serve.log" >&2; fail "serve exited $rc on SIGTERM"; }
echo "PASS"
