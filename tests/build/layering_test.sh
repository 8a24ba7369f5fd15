#!/usr/bin/env bash
# The module boundaries are enforced by the build: in a copy of the sources, an include of a
# module that rules/ may not use (cri/) makes `cmake --build` of rp_rules fail, naming the file
# and the include; the unchanged copy passes the same check; a header included without its
# folder fails too.
# Usage: layering_test.sh SOURCE_DIR
set -euo pipefail
src=$1
fail() { echo "FAIL: $*" >&2; exit 1; }
tmp=$(mktemp -d /tmp/rp-layering.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/src"
for d in CMakeLists.txt cmake daemon proto config systemd packaging; do
  cp -r "$src/$d" "$tmp/src/"
done
cmake -S "$tmp/src" -B "$tmp/b" -G Ninja -DRP_BUILD_TESTS=OFF -DRP_BUILD_BENCH=OFF \
  >"$tmp/configure.log" 2>&1 || { cat "$tmp/configure.log" >&2; fail "configure"; }
check() { cmake --build "$tmp/b" --target rp_rules_layering >"$tmp/build.log" 2>&1; }

check || { cat "$tmp/build.log" >&2; fail "the unchanged tree fails its layering check"; }
echo "unchanged tree: layering check passes"

victim=$tmp/src/daemon/src/rules/policy.cc
cp "$victim" "$tmp/policy.cc.orig"
sed -i '0,/^#include "rules\/policy.h"/s//&\n#include "cri\/h2_relay.h"/' "$victim"
grep -q '"cri/h2_relay.h"' "$victim" || fail "could not plant the include"
if check; then fail "rules/ including cri/h2_relay.h built"; fi
grep -q "policy.cc: module 'rules' may not include \"cri/h2_relay.h\"" "$tmp/build.log" ||
  { cat "$tmp/build.log" >&2; fail "the failure does not say where and what"; }
echo "rules/ -> cri/: the build fails and says: $(grep -o "policy.cc: module.*h2_relay.h\"" "$tmp/build.log")"

cp "$tmp/policy.cc.orig" "$victim"
sed -i 's|#include "rules/policy.h"|#include "policy.h"|' "$victim"
if check; then fail "an include without its module folder built"; fi
grep -q 'policy.cc: "policy.h": include our headers with their module folder' "$tmp/build.log" ||
  { cat "$tmp/build.log" >&2; fail "the folder-less include is not named"; }
echo "folder-less include: the build fails"
echo "PASS"
