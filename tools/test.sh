#!/usr/bin/env bash
# The one command that runs qcow2fs's whole test suite:
#
#   tools/test.sh            all default stages
#   tools/test.sh asan fuzz  only the named stages (deps always runs first)
#
# Stages (one function each, stage_NAME):
#   deps     tools/install-deps.sh (apt-get only for what is missing)
#   release  build/       release build, meson test
#   asan     build-asan/  ASan+UBSan debugoptimized build, -Werror, meson test
#   fuzz     build-fuzz/  clang libFuzzer build (ASan+UBSan), seed corpus from
#                         qemu-img, FUZZ_SECONDS (default 60) of fuzzing
#   mount    tests/mount/run_all.sh against the release build
#   tsan     build-tsan/  ThreadSanitizer build of the concurrency tests
#
# Every stage runs even if an earlier one failed (except deps, which stops
# everything); the script exits non-zero if any stage failed and ends with
# the line "N passed, N failed" counting stages. With CI=true the release
# build adds -Dwerror=true (the sanitizer builds always use it).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

JOBS=${JOBS:-2}
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
# The write fuzzer's seed: fixed, so that a run is reproducible (CI runs the
# same inputs every time); FUZZ_SEED=0 lets libFuzzer pick one.
FUZZ_SEED=${FUZZ_SEED:-1}
# At most this many write-fuzzer inputs (-1: until FUZZ_SECONDS runs out);
# with the fixed seed, CI explores the same inputs on every run.
FUZZ_WRITE_RUNS=${FUZZ_WRITE_RUNS:-2500}
CI=${CI:-false}

export ASAN_OPTIONS=${ASAN_OPTIONS:-halt_on_error=1:abort_on_error=1:detect_leaks=1:print_summary=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:abort_on_error=1:print_stacktrace=1:print_summary=1}
export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1}

log() { printf '\n==== %s\n' "$*"; }

# meson setup, or reconfigure an existing build directory with the same
# options (so re-runs are incremental).
meson_setup() {
  local dir=$1
  shift
  if [[ -f "$dir/meson-private/coredata.dat" ]]; then
    meson setup --reconfigure "$dir" "$@"
  else
    rm -rf "$dir"
    meson setup "$dir" "$@"
  fi
}

# meson test with the logs of failures printed.
meson_test() {
  local dir=$1
  shift
  local rc=0
  meson test -C "$dir" --num-processes "$JOBS" --print-errorlogs "$@" || rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "---- meson test failed in $dir (exit $rc); each failed GoogleTest case:"
    # meson shows only the last 100 lines of a failing binary; print every
    # failed case's own output from the full log.
    awk '/^\[ RUN      \]/ { buf = ""; inrun = 1 }
         inrun { buf = buf $0 "\n" }
         /^\[       OK \]/ { inrun = 0 }
         /^\[  FAILED  \]/ && inrun { printf "%s", buf; inrun = 0 }' \
      "$dir/meson-logs/testlog.txt" | head -c 200000 || true
    echo "---- full log: $dir/meson-logs/testlog.txt"
  fi
  return $rc
}

werror_args() {
  if [[ "$CI" == "true" ]]; then
    echo "-Dwerror=true"
  fi
}

# ------------------------------------------------------------------ stages

stage_deps() {
  "$ROOT/tools/install-deps.sh"
}

stage_release() {
  # shellcheck disable=SC2046
  meson_setup build -Dbuildtype=release -Dtests=true -Dfuzzer=false $(werror_args)
  ninja -C build -j "$JOBS"
  meson_test build
}

stage_asan() {
  meson_setup build-asan -Dbuildtype=debugoptimized -Dtests=true -Dfuzzer=false \
    -Db_sanitize=address,undefined -Db_lundef=false -Dwerror=true \
    -Dcpp_args=-fno-sanitize-recover=all -Dcpp_link_args=-fno-sanitize-recover=all
  # Only the test programs: the daemon runs from the release build in the
  # mount stage, so compiling it again here buys nothing. qcow2fs-img is
  # what the img_cli test runs, so it is built (and checked) here too.
  local targets
  targets=$(ninja -C build-asan -t targets all |
            awk -F: '/^((tests|fuse)\/[a-z_]+_test|tools\/qcow2fs-img):/ { print $1 }')
  [[ -n $targets ]] || { echo "no test targets found in build-asan"; return 1; }
  # shellcheck disable=SC2086
  ninja -C build-asan -j "$JOBS" $targets
  meson_test build-asan --no-rebuild --timeout-multiplier 2
}

stage_tsan() {
  meson_setup build-tsan -Dbuildtype=debugoptimized -Dtests=true -Dfuzzer=false \
    -Db_sanitize=thread -Db_lundef=false -Dwerror=true
  # The tests whose point is concurrency; the rest gain nothing from TSan.
  local tests=(concurrency_stress_test compressed_write_test image_lock_test model_stress_test
               interleaving_test)
  ninja -C build-tsan -j "$JOBS" "${tests[@]/#/tests/}" fuse/fuse_io_pipeline_test
  meson_test build-tsan --no-rebuild --timeout-multiplier 3 "${tests[@]}" fuse_io_pipeline
}

stage_fuzz() {
  command -v clang++ >/dev/null || { echo "clang++ not found"; return 1; }
  if [[ -f build-fuzz/meson-private/coredata.dat ]]; then
    meson_setup build-fuzz -Dbuildtype=debugoptimized -Dtests=true -Dfuzzer=true \
      -Db_sanitize=address,undefined -Db_lundef=false \
      -Dcpp_args=-fno-sanitize-recover=all -Dcpp_link_args=-fno-sanitize-recover=all
  else
    CC=clang CXX=clang++ meson_setup build-fuzz -Dbuildtype=debugoptimized \
      -Dtests=true -Dfuzzer=true \
      -Db_sanitize=address,undefined -Db_lundef=false \
      -Dcpp_args=-fno-sanitize-recover=all -Dcpp_link_args=-fno-sanitize-recover=all
  fi
  # Only the fuzzers: the test binaries are covered by the other stages.
  ninja -C build-fuzz -j "$JOBS" tests/fuzz/open_read_fuzzer tests/fuzz/write_fuzzer
  # FUZZ_SECONDS is split between the two: open+read, then the write path.
  # tests/fuzz/write_regressions holds inputs that once found bugs; they are
  # run first, with the seeds.
  local read_seconds=$(( (FUZZ_SECONDS + 1) / 2 )) write_seconds=$(( FUZZ_SECONDS / 2 ))
  local seeds=build-fuzz/fuzz-seeds corpus=build-fuzz/fuzz-corpus
  local wseeds=build-fuzz/fuzz-write-seeds wcorpus=build-fuzz/fuzz-write-corpus
  local artifacts=build-fuzz/fuzz-artifacts
  rm -rf "$seeds" "$wseeds" "$artifacts"
  mkdir -p "$corpus" "$wcorpus" "$artifacts/read" "$artifacts/write"
  tests/fuzz/make_seed_corpus.sh "$seeds"
  tests/fuzz/make_write_seed_corpus.sh "$wseeds"
  local rc=0 wrc=0
  build-fuzz/tests/fuzz/open_read_fuzzer \
    -max_total_time="$read_seconds" -timeout=20 -rss_limit_mb=2560 \
    -print_final_stats=1 -artifact_prefix="$artifacts/read/" \
    "$corpus" "$seeds" || rc=$?
  build-fuzz/tests/fuzz/write_fuzzer -seed="$FUZZ_SEED" -runs="$FUZZ_WRITE_RUNS" \
    -max_total_time="$write_seconds" -timeout=20 -rss_limit_mb=2560 \
    -print_final_stats=1 -artifact_prefix="$artifacts/write/" \
    "$wcorpus" "$wseeds" tests/fuzz/write_regressions || wrc=$?
  if [[ $rc -ne 0 || $wrc -ne 0 ]]; then
    echo "---- fuzzer failed (open_read_fuzzer exit $rc, write_fuzzer exit $wrc); reproducers:"
    ls -l "$artifacts/read" "$artifacts/write" || true
    echo "(rerun one with build-fuzz/tests/fuzz/<fuzzer> FILE; WRITE_FUZZER_TRACE=1 prints the write program)"
    [[ $rc -ne 0 ]] && return $rc
    return $wrc
  fi
}

stage_mount() {
  if [[ ! -x tests/mount/run_all.sh && ! -f tests/mount/run_all.sh ]]; then
    echo "tests/mount/run_all.sh is not present"
    return 1
  fi
  [[ -d build ]] || { echo "no release build (build/); run the release stage"; return 1; }
  bash tests/mount/run_all.sh "$ROOT/build"
}

# ------------------------------------------------------------------ driver

DEFAULT_STAGES=(release asan tsan fuzz mount)

if [[ $# -gt 0 ]]; then
  STAGES=("$@")
else
  STAGES=("${DEFAULT_STAGES[@]}")
fi
for s in "${STAGES[@]}"; do
  if ! declare -F "stage_$s" >/dev/null; then
    echo "unknown stage: $s (known: deps release asan fuzz mount tsan)" >&2
    exit 2
  fi
done

passed=0
failed=0
failed_names=()
summary=()

# Runs stage_NAME in a subshell with errexit in force (it must not be called
# from an if/&&/|| context, which would switch errexit off inside it).
last_rc=0
run_stage() {
  local name=$1 start end
  log "stage $name"
  start=$(date +%s)
  set +e
  ( set -euo pipefail; "stage_$name" )
  last_rc=$?
  set -e
  end=$(date +%s)
  if [[ $last_rc -eq 0 ]]; then
    passed=$((passed + 1))
    summary+=("PASS  $name ($((end - start)) s)")
  else
    failed=$((failed + 1))
    failed_names+=("$name")
    summary+=("FAIL  $name ($((end - start)) s, exit $last_rc)")
  fi
}

T0=$(date +%s)
run_stage deps
if [[ $last_rc -ne 0 ]]; then
  echo "dependency installation failed; nothing else can run"
  echo "0 passed, 1 failed"
  exit 1
fi
for s in "${STAGES[@]}"; do
  [[ "$s" == deps ]] && continue
  run_stage "$s"
done

log "summary ($(( $(date +%s) - T0 )) s)"
printf '%s\n' "${summary[@]}"
if [[ $failed -ne 0 ]]; then
  echo "failed stages: ${failed_names[*]}"
fi
echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
