#!/usr/bin/env bash
# The .deb: built with `cpack -G DEB` from this build tree, then
#  1. its contents (dpkg-deb -c): the bundle in /opt/registry-proxy, the unit in
#     /lib/systemd/system, the default config in /etc/registry-proxy, and nothing else;
#  2. its control data (dpkg-deb -I): name, version, Depends, the config as a conffile,
#     maintainer scripts that never mention kubelet;
#  3. the extracted files: the unit and config are the repository's, the binary runs;
#  4. dpkg itself installing, upgrading, removing and purging it in a fake root (dpkg --root:
#     busybox as /bin/sh, systemctl a recorder): what the maintainer scripts run, with and
#     without a running systemd, and that the conffile survives a remove but not a purge.
# Usage: deb_test.sh BUILD_DIR BINARY
set -euo pipefail
build=$1 bin=$2
src=$(cd "$(dirname "$0")/../.." && pwd)

fail() { echo "FAIL: $*" >&2; exit 1; }
for t in cpack dpkg-deb dpkg patchelf; do
  command -v "$t" >/dev/null || fail "$t is missing"
done
[ -x /bin/busybox ] || fail "/bin/busybox is missing (busybox-static)"
[ "$(id -u)" -eq 0 ] || fail "needs root (dpkg --root chroots to run the maintainer scripts)"
[ -x "$bin" ] || fail "$bin not built"

tmp=$(mktemp -d /tmp/rp-deb-test.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

(cd "$tmp" && cpack -G DEB -B "$tmp/out" --config "$build/CPackConfig.cmake" >"$tmp/cpack.log" 2>&1) ||
  { cat "$tmp/cpack.log" >&2; fail "cpack -G DEB failed"; }
debs=("$tmp"/out/registry-proxy_*.deb)
[ ${#debs[@]} -eq 1 ] && [ -f "${debs[0]}" ] || fail "cpack made no single .deb: ${debs[*]}"
deb=${debs[0]}
echo "built $(basename "$deb") ($(stat -c %s "$deb") bytes)"

# 1. Contents.
dpkg-deb -c "$deb" >"$tmp/contents"
has() {
  grep -qE "^$1 root/root +[0-9]+ [0-9-]+ [0-9:]+ \./$2\$" "$tmp/contents" ||
    fail "the package lacks $2 ($1 root/root)"
}
has '-rwxr-xr-x' 'opt/registry-proxy/bin/registry-proxy'
has '-rw-r--r--' 'lib/systemd/system/registry-proxy.service'
has '-rw-r--r--' 'lib/systemd/system/registry-proxy.socket'
has '-rw-r--r--' 'etc/registry-proxy/config.yaml'
has '-rw-r--r--' 'opt/registry-proxy/lib/libprotobuf\.so\.[0-9.]+'
has '-rw-r--r--' 'opt/registry-proxy/lib/libstdc\+\+\.so\.6'
stray=$(awk '{print $6}' "$tmp/contents" |
  grep -vE '^\./(|opt/|opt/registry-proxy/.*|lib/|lib/systemd/|lib/systemd/system/.*|etc/|etc/registry-proxy/.*)$' || true)
[ -z "$stray" ] || fail "unexpected files in the package:"$'\n'"$stray"
echo "contents: $(grep -c 'opt/registry-proxy/lib/.' "$tmp/contents") bundled libraries, unit, config; nothing else"

# 2. Control data.
dpkg-deb -I "$deb" >"$tmp/info"
grep -qx ' Package: registry-proxy' "$tmp/info" || fail "Package is not registry-proxy"
version=$(sed -n 's/^project(registry-proxy VERSION \([0-9.]*\).*/\1/p' "$src/CMakeLists.txt")
grep -qx " Version: $version" "$tmp/info" || fail "Version is not $version"
grep -qE '^ Depends: libc6 \(>= 2\.[0-9]+\)$' "$tmp/info" || fail "Depends is not libc6 only"
mkdir "$tmp/control"
dpkg-deb -e "$deb" "$tmp/control"
[ "$(cat "$tmp/control/conffiles")" = /etc/registry-proxy/config.yaml ] ||
  fail "conffiles: $(cat "$tmp/control/conffiles")"
for s in postinst prerm postrm; do
  [ -x "$tmp/control/$s" ] || fail "no executable $s"
  ! grep -qi kubelet "$tmp/control/$s" || fail "$s mentions kubelet"
done
echo "control: version $version, libc6 only, conffile, maintainer scripts without kubelet"

# 3. Files.
dpkg-deb -x "$deb" "$tmp/x"
cmp "$tmp/x/lib/systemd/system/registry-proxy.service" "$src/systemd/registry-proxy.service" ||
  fail "the packaged unit is not systemd/registry-proxy.service"
cmp "$tmp/x/lib/systemd/system/registry-proxy.socket" "$src/systemd/registry-proxy.socket" ||
  fail "the packaged socket unit is not systemd/registry-proxy.socket"
cmp "$tmp/x/etc/registry-proxy/config.yaml" "$src/config/config.yaml" ||
  fail "the packaged config is not config/config.yaml"
"$tmp/x/opt/registry-proxy/bin/registry-proxy" check-config "$tmp/x/etc/registry-proxy/config.yaml" \
  >/dev/null || fail "the packaged binary cannot check the packaged config"
echo "files: unit and config as in the repository; binary runs"

# 4. dpkg in a fake root.
make_root() {
  local r=$1
  mkdir -p "$r"/var/lib/dpkg/{info,updates,triggers} "$r/bin" "$r/usr/bin" "$r/dev" "$r/tmp" \
    "$r/opt"  # as base-files' postinst makes it: a directory no package owns
  : >"$r/var/lib/dpkg/status"
  cp /bin/busybox "$r/bin/"
  ln -s busybox "$r/bin/sh"
  mknod -m 0666 "$r/dev/null" c 1 3
  printf '#!/bin/sh\necho "systemctl $*" >>/systemctl.calls\n' >"$r/usr/bin/systemctl"
  chmod 0755 "$r/usr/bin/systemctl"
  : >"$r/systemctl.calls"
}
calls() { tr '\n' ';' <"$1/systemctl.calls"; }
dpkg_in() {
  local r=$1
  shift
  dpkg --root="$r" --force-depends "$@" >>"$tmp/dpkg.log" 2>&1 ||
    { cat "$tmp/dpkg.log" >&2; fail "dpkg $* failed"; }
}

# With systemd running.
r=$tmp/root
make_root "$r"
mkdir -p "$r/run/systemd/system"
dpkg_in "$r" -i "$deb"
[ "$(calls "$r")" = "systemctl enable registry-proxy.socket registry-proxy.service;systemctl daemon-reload;systemctl start registry-proxy.socket registry-proxy.service;" ] ||
  fail "install ran: $(calls "$r")"
[ -x "$r/opt/registry-proxy/bin/registry-proxy" ] || fail "binary not installed"
echo "# changed by the operator" >>"$r/etc/registry-proxy/config.yaml"
: >"$r/systemctl.calls"
dpkg_in "$r" -i "$deb"  # upgrade (same version again): restart, config kept
[ "$(calls "$r")" = "systemctl enable registry-proxy.socket registry-proxy.service;systemctl daemon-reload;systemctl restart registry-proxy.service;" ] ||
  fail "upgrade ran: $(calls "$r")"
grep -q "changed by the operator" "$r/etc/registry-proxy/config.yaml" || fail "upgrade replaced the changed conffile"
: >"$r/systemctl.calls"
dpkg_in "$r" -r registry-proxy
[ "$(calls "$r")" = "systemctl stop registry-proxy.service registry-proxy.socket;systemctl disable registry-proxy.service registry-proxy.socket;systemctl daemon-reload;" ] ||
  fail "remove ran: $(calls "$r")"
[ ! -e "$r/opt/registry-proxy" ] && [ ! -e "$r/lib/systemd/system/registry-proxy.service" ] &&
  [ ! -e "$r/lib/systemd/system/registry-proxy.socket" ] ||
  fail "remove left the binary or the unit"
grep -q "changed by the operator" "$r/etc/registry-proxy/config.yaml" || fail "remove dropped the conffile"
[ -d "$r/opt" ] || fail "remove deleted /opt (no package owns it; it was there before)"
dpkg_in "$r" -P registry-proxy
[ ! -e "$r/etc/registry-proxy" ] || fail "purge left /etc/registry-proxy"
[ -d "$r/opt" ] && [ "$(stat -c %a "$r/opt")" = 755 ] || fail "purge deleted /opt or changed its mode"
if grep -qi kubelet "$r/systemctl.calls"; then fail "a maintainer script touched kubelet"; fi
echo "dpkg with systemd: install, upgrade (conffile kept), remove (conffile kept), purge: ok"

# Without a running systemd (a node image being built): enabled, not started.
r2=$tmp/root2
make_root "$r2"
dpkg_in "$r2" -i "$deb"
[ "$(calls "$r2")" = "systemctl enable registry-proxy.socket registry-proxy.service;" ] ||
  fail "install without systemd ran: $(calls "$r2")"
echo "dpkg without systemd: enabled only"
echo "PASS"
