#!/usr/bin/env bash
# The one command that runs qcow2fs's whole test suite:
#
#   tools/test.sh            all default stages
#   tools/test.sh asan fuzz  only the named stages (deps always runs first)
#
# Stages (one function each, stage_NAME):
#   deps     tools/install-deps.sh (apt-get only for what is missing)
#   format   every C++ file as clang-format-14 lays it out (.clang-format);
#            fails naming the files and lines that differ
#   tidy     (not run by default: about 3 minutes on 2 cores) clang-tidy-14
#            with .clang-tidy over the core, the daemons and the tools,
#            findings as errors, on the tsa stage's compile database
#   release  build/       release build of what ships (the mount stage runs
#                         it), and the stress and crash tests at full speed
#   tsa      build-tsa/   clang build of the core library, the daemon and the
#                         tools, and a compile of the tests, with
#                         -Wthread-safety(-beta) as errors: the lock
#                         annotations (src/base/) are checked
#   asan     build-asan/  ASan+UBSan debugoptimized build, -Werror, meson test
#   fuzz     build-fuzz/  clang libFuzzer build (ASan+UBSan), seed corpus from
#                         qemu-img, FUZZ_SECONDS (default 60) of fuzzing
#   mount    tests/mount/run_all.sh against the release build
#   tsan     build-tsan/  ThreadSanitizer build of the concurrency tests
#   package  the Debian package (debian/), built by dpkg-buildpackage from a
#            copy of the tree in /tmp, checked by lintian, installed with
#            dpkg -i, used from the installed files only (mount -t
#            fuse.qcow2fs, an fstab line, umount, qcow2fs-img, man pages,
#            bash completion), then purged
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

stage_format() {
  command -v clang-format-14 >/dev/null || { echo "clang-format-14 not found"; return 1; }
  local files=()
  if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    mapfile -t files < <(git -C "$ROOT" ls-files '*.cc' '*.h')
  else
    mapfile -t files < <(find src include fuse tests tools -name '*.cc' -o -name '*.h')
  fi
  [[ ${#files[@]} -gt 0 ]] || { echo "no C++ files found"; return 1; }
  if ! clang-format-14 --dry-run --Werror "${files[@]}"; then
    echo "---- not formatted; fix with: clang-format-14 -i FILE..."
    return 1
  fi
  echo "${#files[@]} files formatted as .clang-format says"
}

stage_tidy() {
  command -v clang-tidy-14 >/dev/null || { echo "clang-tidy-14 not found"; return 1; }
  [[ -f build-tsa/compile_commands.json ]] || stage_tsa
  local files=()
  mapfile -t files < <(git -C "$ROOT" ls-files 'src/*.cc' 'fuse/*.cc' 'tools/*.cc' |
                       grep -v '_test\.cc$')
  [[ ${#files[@]} -gt 0 ]] || { echo "no C++ files found"; return 1; }
  printf '%s\0' "${files[@]}" |
    xargs -0 -n 1 -P "$JOBS" clang-tidy-14 -p build-tsa --quiet
  echo "${#files[@]} files clean under .clang-tidy"
}

# What ships, built as it ships (the mount stage runs these programs), and
# the tests whose reach grows with the build's speed: the stress and crash
# tests run more operations and crash points here than under the
# sanitizers, and meet thread interleavings the sanitizers' slowdown hides.
# Every test, these included, runs in the ASan stage.
stage_release() {
  # shellcheck disable=SC2046
  meson_setup build -Dbuildtype=release -Dtests=true -Dfuzzer=false $(werror_args)
  local tests=(model_stress_test crash_safety_test concurrent_crash_test concurrency_stress_test)
  ninja -C build -j "$JOBS" fuse/mount.qcow2fs fuse/umount.fuse.qcow2fs tools/qcow2fs-img \
    tools/bench/qcow2fs-read-bench "${tests[@]/#/tests/}"
  meson_test build --no-rebuild "${tests[@]}"
}

# Clang's thread-safety analysis over everything that takes a lock: the
# core, the daemon, the tools, and the tests with their support code and
# test doubles. The analysis is done by the compiler, so the tests are
# compiled only (their objects), neither linked nor run; the tests' copy of
# the core (the same sources with sync points compiled in) is left out.
stage_tsa() {
  command -v clang++ >/dev/null || { echo "clang++ not found"; return 1; }
  local args="['-Wthread-safety', '-Wthread-safety-beta', '-Werror=thread-safety']"
  if [[ -f build-tsa/meson-private/coredata.dat ]]; then
    meson_setup build-tsa -Dbuildtype=debug -Dtests=true -Dfuzzer=false -Dcpp_args="$args"
  else
    CC=clang CXX=clang++ meson_setup build-tsa -Dbuildtype=debug -Dtests=true -Dfuzzer=false \
      -Dcpp_args="$args"
  fi
  grep -q '"command": "clang++ ' build-tsa/compile_commands.json ||
    { echo "build-tsa was set up with another compiler than clang: remove it"; return 1; }
  local test_objects
  test_objects=$(ninja -C build-tsa -t targets all |
                 awk -F: '/^(tests|fuse\/fuse_[a-z_]+_test\.p)\/.*\.o: / { print $1 }')
  [[ -n $test_objects ]] || { echo "no test objects found in build-tsa"; return 1; }
  # shellcheck disable=SC2086
  ninja -C build-tsa -j "$JOBS" src/libqcow2fs-core.a fuse/mount.qcow2fs \
    fuse/umount.fuse.qcow2fs tools/qcow2fs-img tools/bench/qcow2fs-read-bench $test_objects
}

stage_asan() {
  meson_setup build-asan -Dbuildtype=debugoptimized -Dtests=true -Dfuzzer=false \
    -Db_sanitize=address,undefined -Db_lundef=false -Dwerror=true \
    -Dcpp_args="['-fno-sanitize-recover=all', '-g1']" \
    -Dcpp_link_args=-fno-sanitize-recover=all
  # -g1: line tables are all a sanitizer's report needs, and full debug
  # information makes this build a third slower to compile.
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
    -Db_sanitize=thread -Db_lundef=false -Dwerror=true -Dcpp_args=-g1
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

# The Debian package, built from a copy of the tree (dpkg-buildpackage puts
# its output next to the source, so nothing lands in the tree), then
# installed on this machine, used from the installed files alone and purged.
# A trap purges and unmounts even when a step fails.
stage_package() {
  local state
  state=$(dpkg-query -W -f='${db:Status-Status}' qcow2fs 2>/dev/null || true)
  if [[ -n $state && $state != not-installed ]]; then
    echo "the qcow2fs package is on this machine already ($state); this stage installs"
    echo "and purges it: remove it first (apt-get purge qcow2fs)"
    return 1
  fi
  local work src version arch deb changes t
  work=$(mktemp -d /tmp/qcow2fs-package.XXXXXX)
  src=$work/qcow2fs
  PKG_WORK=$work PKG_INSTALLED=false
  trap package_cleanup EXIT

  # The tree as git sees it (committed or not, without what .gitignore
  # names: build directories); a tree that is no git checkout, without them.
  mkdir "$src"
  if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$ROOT" ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done |
      tar -C "$ROOT" --null -T - -cf - | tar -C "$src" -xf -
  else
    tar -C "$ROOT" --exclude='./build*' --exclude=./debian/.debhelper -cf - . | tar -C "$src" -xf -
  fi

  version=$(dpkg-parsechangelog -l "$src/debian/changelog" -S Version)
  local project_version
  project_version=$(sed -n "s/^  version : '\(.*\)',$/\1/p" "$src/meson.build")
  if [[ $version != "$project_version" ]]; then
    echo "debian/changelog has version $version, meson.build $project_version"
    return 1
  fi
  arch=$(dpkg --print-architecture)
  deb=$work/qcow2fs_${version}_${arch}.deb
  changes=$work/qcow2fs_${version}_${arch}.changes

  echo "-- dpkg-buildpackage -b -us -uc (log: $work/build.log)"
  t=$(date +%s)
  if ! (cd "$src" && DEB_BUILD_OPTIONS="parallel=$JOBS nocheck" \
          dpkg-buildpackage -b -us -uc) >"$work/build.log" 2>&1; then
    tail -n 60 "$work/build.log"
    echo "dpkg-buildpackage failed"
    return 1
  fi
  echo "   built $(basename "$deb") in $(( $(date +%s) - t )) s"
  dpkg-deb -f "$deb" Package Version Architecture Depends
  dpkg-deb -c "$deb" | awk '{ print "   " $1, $6, $7, $8 }'

  echo "-- lintian (fails on errors; warnings listed)"
  t=$(date +%s)
  lintian --fail-on error --display-info "$changes"
  echo "   lintian: no errors ($(( $(date +%s) - t )) s)"

  echo "-- dpkg -i, apt-get -f install"
  PKG_INSTALLED=true
  dpkg -i "$deb" || echo "   (dpkg -i left dependencies to apt-get -f install)"
  DEBIAN_FRONTEND=noninteractive apt-get -f install -y
  state=$(dpkg-query -W -f='${db:Status-Abbrev}' qcow2fs)
  [[ $state == "ii " ]] || { echo "qcow2fs is not installed after apt-get -f install: '$state'"; return 1; }
  dpkg -L qcow2fs >"$work/files"

  # From here on, only the installed files: no build tree on PATH.
  export PATH=/usr/sbin:/usr/bin:/sbin:/bin
  local prog where
  for prog in mount.qcow2fs mount.fuse.qcow2fs umount.fuse.qcow2fs qcow2fs qcow2fs-img; do
    where=$(command -v "$prog") || { echo "$prog is not installed"; return 1; }
    [[ $where == /usr/* ]] || { echo "$prog found at $where, not under /usr"; return 1; }
  done
  # mount(8) and umount(8) run helpers from /sbin only.
  [[ -x /sbin/mount.fuse.qcow2fs && -x /sbin/umount.fuse.qcow2fs ]] ||
    { echo "/sbin/mount.fuse.qcow2fs or /sbin/umount.fuse.qcow2fs is missing"; return 1; }
  qcow2fs-img --version
  mount.qcow2fs --version

  echo "-- mount -t fuse.qcow2fs, write and read 8 MiB, umount, qemu-img check and compare"
  local img=$work/vm.qcow2 mnt=$work/mnt expected=$work/expected.raw pid
  mkdir "$mnt"
  PKG_MNT=$mnt
  qemu-img create -q -f qcow2 "$img" 64M
  head -c 8M /dev/urandom >"$work/data"
  truncate -s 64M "$expected"
  dd if="$work/data" of="$expected" bs=1M seek=3 conv=notrunc status=none
  mount -t fuse.qcow2fs "$img" "$mnt"
  findmnt -n -o FSTYPE,OPTIONS "$mnt"
  [[ $(findmnt -n -o FSTYPE "$mnt") == fuse.qcow2fs ]] || { echo "not a fuse.qcow2fs mount"; return 1; }
  pid=$(pgrep -f -n -- "$img") || { echo "no daemon serving $img"; return 1; }
  [[ $(readlink "/proc/$pid/exe") == /usr/sbin/mount.qcow2fs ]] ||
    { echo "the daemon runs $(readlink "/proc/$pid/exe"), not the installed one"; return 1; }
  dd if="$work/data" of="$mnt/vm.raw" bs=1M seek=3 conv=notrunc,fsync status=none
  cmp -n $((8 << 20)) "$work/data" <(dd if="$mnt/vm.raw" bs=1M skip=3 count=8 status=none)
  umount "$mnt"
  # umount ran the helper, which waits until the image is closed: the lock
  # is free at once.
  qemu-img check "$img"
  qemu-img compare -f qcow2 -F raw "$img" "$expected"

  echo "-- an fstab line (mount -T FILE: a file in fstab format), read-only"
  printf '%s %s fuse.qcow2fs ro,noauto,nofail 0 0\n' "$img" "$mnt" >"$work/fstab"
  mount -T "$work/fstab" "$mnt"
  findmnt -n -o FSTYPE,OPTIONS "$mnt"
  [[ ,$(findmnt -n -o OPTIONS "$mnt"), == *,ro,* ]] || { echo "the fstab mount is not read-only"; return 1; }
  cmp "$expected" "$mnt/vm.raw"
  umount "$mnt"
  qemu-img compare -f qcow2 -F raw "$img" "$expected"

  echo "-- manual pages and bash completion"
  if command -v man >/dev/null; then
    for prog in mount.qcow2fs mount.fuse.qcow2fs umount.fuse.qcow2fs qcow2fs qcow2fs-img; do
      man -w "$prog"
    done
  else
    echo "   (no man-db: manual pages not looked up)"
  fi
  bash "$ROOT/tests/completion/completion_test.sh" \
    --completions /usr/share/bash-completion/completions \
    --daemon /usr/sbin/mount.qcow2fs --img /usr/bin/qcow2fs-img

  echo "-- apt-get purge qcow2fs"
  DEBIAN_FRONTEND=noninteractive apt-get purge -y qcow2fs
  PKG_INSTALLED=false
  state=$(dpkg-query -W -f='${db:Status-Status}' qcow2fs 2>/dev/null || true)
  [[ -z $state || $state == not-installed ]] || { echo "qcow2fs is still $state after purge"; return 1; }
  local left=()
  while IFS= read -r f; do
    [[ -d $f && ! -L $f ]] && continue
    [[ -e $f || -L $f ]] && left+=("$f")
  done <"$work/files"
  [[ -e /usr/share/doc/qcow2fs ]] && left+=(/usr/share/doc/qcow2fs)
  if [[ ${#left[@]} -gt 0 ]]; then
    echo "left after purge: ${left[*]}"
    return 1
  fi
  echo "   purged: none of its $(wc -l <"$work/files") paths is left"
}

# The package stage's trap: unmount, purge what it installed, remove its
# files; keeps the stage's exit status.
package_cleanup() {
  local rc=$?
  if [[ -n ${PKG_MNT:-} ]] && mountpoint -q "$PKG_MNT"; then
    timeout 60 umount "$PKG_MNT" || fusermount3 -uz "$PKG_MNT" || true
  fi
  if [[ ${PKG_INSTALLED:-false} == true ]] &&
     [[ -n $(dpkg-query -W -f='${db:Status-Status}' qcow2fs 2>/dev/null | grep -v not-installed) ]]; then
    echo "-- cleanup: apt-get purge qcow2fs"
    DEBIAN_FRONTEND=noninteractive apt-get purge -y qcow2fs >/dev/null || dpkg --purge qcow2fs || true
  fi
  [[ -n ${PKG_WORK:-} ]] && rm -rf "$PKG_WORK"
  exit $rc
}

# ------------------------------------------------------------------ driver

DEFAULT_STAGES=(format release tsa asan tsan fuzz mount package)

if [[ $# -gt 0 ]]; then
  STAGES=("$@")
else
  STAGES=("${DEFAULT_STAGES[@]}")
fi
for s in "${STAGES[@]}"; do
  if ! declare -F "stage_$s" >/dev/null; then
    echo "unknown stage: $s (known: deps format tidy release tsa asan fuzz mount tsan package)" >&2
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
