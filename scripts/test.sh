#!/usr/bin/env bash
# Runs every test: installs what is missing (Debian 12), builds, and runs the unit tests
# normally, under ASan+UBSan and under TSan, then the fuzzers for a bounded time, then the
# engine benchmark (it prints numbers; nothing is timed as a pass/fail).
#
#   scripts/test.sh                      # everything
#   RP_STAGES="unit" scripts/test.sh     # a subset: unit asan tsan fuzz bench
#   RP_FUZZ_SECONDS=10 scripts/test.sh   # fuzz time per target (default 30)
set -euo pipefail
RP_ROOT=$(cd "$(dirname "$0")/.." && pwd)
source "$RP_ROOT/scripts/deps.sh"
STAGES=${RP_STAGES:-"unit asan tsan fuzz bench"}
BUILD=${RP_BUILD_DIR:-$RP_ROOT/build}
FUZZ_SECONDS=${RP_FUZZ_SECONDS:-30}

rp_install_deps test
# Our own code's warnings are errors here (not in users' and packagers' builds).
export RP_WERROR=ON
has() { [[ " $STAGES " == *" $1 "* ]]; }
# In CI the integration tests (real containerd and registries, root) must run, not skip.
if [ "${CI:-}" = "true" ]; then export RP_REQUIRE_INTEGRATION=1; fi
failed=()

run_ctest() {  # DIR NAME
  echo "== ctest ($2)"
  if ! ctest --test-dir "$1" --output-on-failure -j "${RP_JOBS:-2}" --timeout 300; then
    failed+=("$2")
  fi
}

if has unit || has bench; then
  echo "== build ($BUILD)"
  rp_build "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo
fi
has unit && run_ctest "$BUILD" unit

if has asan; then
  echo "== build (ASan+UBSan)"
  rp_build "$BUILD-asan" -DCMAKE_BUILD_TYPE=Debug -DRP_SANITIZE=address -DRP_BUILD_BENCH=OFF
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    run_ctest "$BUILD-asan" "asan+ubsan"
fi

if has tsan; then
  echo "== build (TSan)"
  rp_build "$BUILD-tsan" -DCMAKE_BUILD_TYPE=Debug -DRP_SANITIZE=thread -DRP_BUILD_BENCH=OFF
  TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:suppressions=$RP_ROOT/tests/tsan.supp" \
    run_ctest "$BUILD-tsan" tsan
fi

if has fuzz; then
  echo "== build (libFuzzer, clang)"
  rp_build "$BUILD-fuzz" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER=clang \
    -DCMAKE_CXX_COMPILER=clang++ -DRP_BUILD_FUZZ=ON -DRP_BUILD_TESTS=OFF -DRP_BUILD_BENCH=OFF
  for f in "$BUILD-fuzz"/tests/fuzz/*_fuzz; do
    name=$(basename "$f" _fuzz)
    corpus="$BUILD-fuzz/corpus/$name"
    mkdir -p "$corpus"
    echo "== fuzz $name for ${FUZZ_SECONDS}s"
    if ! "$f" -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=1024 -print_final_stats=1 \
      "$corpus" "$RP_ROOT/tests/fuzz/corpus/$name" > "$BUILD-fuzz/$name.log" 2>&1; then
      tail -40 "$BUILD-fuzz/$name.log"
      failed+=("fuzz-$name")
    else
      grep -E "stat::number_of_executed_units|Done" "$BUILD-fuzz/$name.log" | tail -2
    fi
  done
fi

if has bench; then
  echo "== benchmark (rule engine; numbers only)"
  "$BUILD/bench/policy_bench" --benchmark_min_time=0.5 --benchmark_counters_tabular=true
  echo "== benchmark (webhook under load on loopback; numbers only)"
  "$RP_ROOT/bench/webhook_load.sh" "$BUILD" || failed+=("bench-webhook")
  echo "== benchmark (CRI hop: containerd vs daemon vs socat, smoke; full run: ninja bench-cri)"
  "$BUILD/bench/cri_load" --smoke || failed+=("bench-cri")
fi

if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED stages: ${failed[*]}"
  exit 1
fi
echo "all test stages passed: $STAGES"
