#!/usr/bin/env bash
# Runs every test: installs what is missing (Debian 12), builds, and runs the unit tests
# normally, under ASan+UBSan and under TSan, then the fuzzers for a bounded time, then the
# engine benchmark (it prints numbers; nothing is timed as a pass/fail).
#
#   scripts/test.sh                      # everything
#   RP_STAGES="unit" scripts/test.sh     # a subset: unit asan tsan fuzz bench
#   RP_FUZZ_SECONDS=10 scripts/test.sh   # fuzz time per target (default 30)
#   RP_CTEST_ARGS="-R webhook" scripts/test.sh   # extra ctest arguments (a subset of tests)
#
# After each stage: its tests run, passed, failed and skipped (each skip with its reason) and
# its time; at the end a table of all stages. The last line is always
# "N passed, N failed, N skipped" (all stages); the exit status is non-zero when any failed.
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
RP_TEST_RUN_ID="$$-$(date +%s)"  # tests/manifests remembers a failed npm ci for the run
export RP_TEST_RUN_ID
total_pass=0 total_fail=0 total_skip=0
table=()

fmt_time() { if [ "$1" -ge 60 ]; then printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); else printf '%ds' "$1"; fi; }
# record STAGE RUN PASSED FAILED SKIPPED BUILD_SECONDS RUN_SECONDS
record() {
  total_pass=$((total_pass + $3)) total_fail=$((total_fail + $4)) total_skip=$((total_skip + $5))
  table+=("$(printf '%-12s %7s %7s %7s %7s %8s %8s' "$1" "$2" "$3" "$4" "$5" \
    "$(fmt_time "$6")" "$(fmt_time "$7")")")
  echo "== $1: $2 run, $3 passed, $4 failed, $5 skipped (build $(fmt_time "$6"), run $(fmt_time "$7"))"
}
summary() {
  echo
  echo "== summary"
  printf '%-12s %7s %7s %7s %7s %8s %8s\n' stage tests passed failed skipped build run
  printf '%s\n' "${table[@]}"
  if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
  fi
  echo "$total_pass passed, $total_fail failed, $total_skip skipped"
}
build_stage() {  # STAGE DIR [cmake args...]: builds; on failure, the summary and exit 1
  local stage=$1 t0=$SECONDS
  shift
  echo "== build ($stage: $1)"
  if ! rp_build "$@"; then
    failed+=("build-$stage")
    record "$stage" 0 0 0 0 $((SECONDS - t0)) 0
    summary
    exit 1
  fi
  build_secs=$((SECONDS - t0))
}

# CTest's JUnit file -> the stage's counts (last line: "COUNTS run passed failed skipped"),
# failed tests, skipped tests grouped by reason, tests that passed with some cases skipped.
# A skip's reason: a "SKIPPED: "/"SKIP: " line of its output, else GoogleTest's message (the line
# after "file:line: Skipped"), else its last line.
# shellcheck disable=SC2016
JUNIT_AWK='
function unesc(s) {
  gsub(/&lt;/, "<", s); gsub(/&gt;/, ">", s); gsub(/&quot;/, "\"", s); gsub(/&apos;/, "'\''", s)
  gsub(/&amp;/, "\\&", s); return s
}
function attr(line, key,   i, rest) {
  i = index(line, key "=\""); if (!i) return ""
  rest = substr(line, i + length(key) + 2); return substr(rest, 1, index(rest, "\"") - 1)
}
function handle(line) {
  if (after_skipped && line != "" && line !~ /^\[  SKIPPED \]/) { gtest_reason = line; after_skipped = 0 }
  if (line ~ /: Skipped$/) after_skipped = 1
  if (line ~ /^(SKIPPED|SKIP): /) { explicit = line; sub(/^[A-Z]+: /, "", explicit) }
  if (line ~ /^PARTLY SKIPPED: /) { partial = line; sub(/^PARTLY SKIPPED: /, "", partial) }
  if (line ~ /[^ \t]/) last = line
}
function skipped(why) {
  skip++
  if (!(why in nreason)) { order[++nreasons] = why; nreason[why] = 0 }
  if (++nreason[why] <= 3) names[why] = names[why] (nreason[why] > 1 ? ", " : "") name
}
/<testcase / {
  name = unesc(attr($0, "name")); status = attr($0, "status")
  skipmsg = explicit = gtest_reason = last = partial = ""; after_skipped = inout = 0; next
}
/<skipped message=/ { skipmsg = attr($0, "message"); next }
/<system-out>/ { inout = 1; sub(/.*<system-out>/, "") }
inout {
  line = $0; end = index(line, "</system-out>")
  if (end) { line = substr(line, 1, end - 1); inout = 0 }
  handle(unesc(line))
}
/<\/testcase>/ {
  run++
  if (status == "run") {
    pass++
    if (partial != "") partials[++npartial] = name ": " partial
  } else if (status == "disabled") {
    skipped("disabled (DISABLED in CMake)")
  } else if (status == "notrun" && skipmsg ~ /^SKIP_/) {
    skipped(explicit != "" ? explicit : gtest_reason != "" ? gtest_reason : last != "" ? last : skipmsg)
  } else {
    fail++; if (fail <= 30) failures[fail] = name (skipmsg != "" ? " (" skipmsg ")" : "")
  }
}
END {
  for (i = 1; i <= fail && i <= 30; i++) print "   FAILED  " failures[i]
  if (fail > 30) print "   FAILED  ... and " (fail - 30) " more"
  for (i = 1; i <= nreasons; i++) {
    why = order[i]; n = nreason[why]
    print "   skipped " n ": " why
    print "           " names[why] (n > 3 ? " and " (n - 3) " more" : "")
  }
  for (i = 1; i <= npartial; i++) print "   passed, partly skipped: " partials[i]
  print "COUNTS " run + 0, pass + 0, fail + 0, skip + 0
}'

run_ctest() {  # DIR NAME
  local junit="$1/Testing/rp-junit.xml" t0=$SECONDS rc=0 counts
  echo "== ctest ($2)"
  rm -f "$junit"
  # shellcheck disable=SC2086  # RP_CTEST_ARGS: words
  ctest --test-dir "$1" --output-on-failure -j "${RP_JOBS:-2}" --timeout 300 \
    --output-junit "$junit" --test-output-size-passed 65536 ${RP_CTEST_ARGS:-} || rc=$?
  [ "$rc" -eq 0 ] || failed+=("$2")
  echo
  if [ -f "$junit" ]; then
    awk "$JUNIT_AWK" "$junit" > "$1/Testing/rp-summary.txt"
    grep -v '^COUNTS ' "$1/Testing/rp-summary.txt" || true
    counts=$(sed -n 's/^COUNTS //p' "$1/Testing/rp-summary.txt")
  else
    echo "   (no JUnit file from ctest: no per-test counts)"
    counts="0 0 $((rc != 0)) 0"
  fi
  # shellcheck disable=SC2086  # counts: four numbers
  record "$2" $counts "${build_secs:-0}" $((SECONDS - t0))
}

build_secs=0
if has unit || has bench; then
  build_stage unit "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo
fi
# The containerd matrix (tests/integration/CMakeLists.txt): the integration suites also run on
# containerd 1.7 and 2.1 from Debian's newer suites, fetched into the cache here. A failed fetch
# (no network) leaves those entries to skip with the reason; in CI they fail.
fetch_containerd_matrix() {
  local v err
  for v in 1.7 2.1; do
    if ! err=$("$RP_ROOT/scripts/fetch-deb.sh" containerd "$v" 2>&1 >/dev/null); then
      echo "== containerd $v: fetch failed: ${err##*$'\n'}"
      RP_CONTAINERD_FETCH_ERROR="${RP_CONTAINERD_FETCH_ERROR:+$RP_CONTAINERD_FETCH_ERROR; }$v: ${err##*$'\n'}"
    fi
  done
  export RP_CONTAINERD_FETCH_ERROR
}
if has unit; then
  fetch_containerd_matrix
  run_ctest "$BUILD" unit
fi

if has asan; then
  build_stage asan+ubsan "$BUILD-asan" -DCMAKE_BUILD_TYPE=Debug -DRP_SANITIZE=address \
    -DRP_BUILD_BENCH=OFF
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    run_ctest "$BUILD-asan" "asan+ubsan"
fi

if has tsan; then
  build_stage tsan "$BUILD-tsan" -DCMAKE_BUILD_TYPE=Debug -DRP_SANITIZE=thread -DRP_BUILD_BENCH=OFF
  TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:suppressions=$RP_ROOT/tests/tsan.supp" \
    run_ctest "$BUILD-tsan" tsan
fi

if has fuzz; then
  build_stage fuzz "$BUILD-fuzz" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER=clang \
    -DCMAKE_CXX_COMPILER=clang++ -DRP_BUILD_FUZZ=ON -DRP_BUILD_TESTS=OFF -DRP_BUILD_BENCH=OFF
  t0=$SECONDS n=0 bad=0
  for f in "$BUILD-fuzz"/tests/fuzz/*_fuzz; do
    name=$(basename "$f" _fuzz)
    corpus="$BUILD-fuzz/corpus/$name"
    mkdir -p "$corpus"
    n=$((n + 1))
    echo "== fuzz $name for ${FUZZ_SECONDS}s"
    # A crashing input goes to the build directory (libFuzzer's default is the working
    # directory: the repository root).
    if ! "$f" -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=1024 -print_final_stats=1 \
      -artifact_prefix="$BUILD-fuzz/$name-" "$corpus" "$RP_ROOT/tests/fuzz/corpus/$name" > "$BUILD-fuzz/$name.log" 2>&1; then
      tail -40 "$BUILD-fuzz/$name.log"
      failed+=("fuzz-$name")
      bad=$((bad + 1))
      echo "   FAILED  fuzz-$name"
    else
      grep -E "stat::number_of_executed_units|Done" "$BUILD-fuzz/$name.log" | tail -2
    fi
  done
  record fuzz "$n" $((n - bad)) "$bad" 0 "$build_secs" $((SECONDS - t0))
fi

if has bench; then
  t0=$SECONDS bad=0
  echo "== benchmark (rule engine; numbers only)"
  "$BUILD/bench/policy_bench" --benchmark_min_time=0.5 --benchmark_counters_tabular=true ||
    { failed+=("bench-policy"); bad=$((bad + 1)); }
  echo "== benchmark (webhook under load on loopback; numbers only)"
  "$RP_ROOT/bench/webhook_load.sh" "$BUILD" || { failed+=("bench-webhook"); bad=$((bad + 1)); }
  echo "== benchmark (CRI hop: containerd vs daemon vs socat, smoke; full run: ninja bench-cri)"
  "$BUILD/bench/cri_load" --smoke || { failed+=("bench-cri"); bad=$((bad + 1)); }
  echo "== benchmark (mirror failover: daemon vs containerd alone, smoke; full run: failover_bench)"
  "$BUILD/bench/failover_bench" --smoke || { failed+=("bench-failover"); bad=$((bad + 1)); }
  record bench 4 $((4 - bad)) "$bad" 0 0 $((SECONDS - t0))
fi

summary
[ ${#failed[@]} -eq 0 ] || exit 1
