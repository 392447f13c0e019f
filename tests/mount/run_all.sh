#!/usr/bin/env bash
# Runs the mount tests: every ro_*.sh, then (without --read-only) every
# write_*.sh, each under a time limit, and ends with "N passed, N failed".
# Exits non-zero if any test failed. Needs root and /dev/fuse.
#
#   tests/mount/run_all.sh [--read-only] MOUNT_QCOW2FS_BINARY|BUILD_DIR
set -uo pipefail

usage() {
  echo "usage: $0 [--read-only] MOUNT_QCOW2FS_BINARY|BUILD_DIR" >&2
  exit 2
}

read_only=false
target=
for arg in "$@"; do
  case $arg in
    --read-only) read_only=true ;;
    -h|--help) usage ;;
    -*) usage ;;
    *) [[ -z $target ]] || usage; target=$arg ;;
  esac
done
[[ -n $target ]] || usage
[[ -d $target ]] && target=$target/fuse/mount.qcow2fs
if [[ ! -x $target ]]; then
  echo "$target is not an executable (build first)" >&2
  echo "0 passed, 1 failed"
  exit 1
fi
target=$(realpath "$target")

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
tests=("$here"/ro_*.sh)
$read_only || tests+=("$here"/write_*.sh)
per_test_limit=${QCOW2FS_MOUNT_TEST_LIMIT:-600}
logs=$(mktemp -d /tmp/qcow2fs-mount-logs.XXXXXX)

passed=0
failed=0
failures=()
for test in "${tests[@]}"; do
  [[ -f $test ]] || continue
  name=$(basename "$test" .sh)
  started=$SECONDS
  # --kill-after: a test ignoring TERM still ends; its trap cleans up on TERM.
  timeout --kill-after=30 "$per_test_limit" bash "$test" "$target" >"$logs/$name.log" 2>&1
  rc=$?
  elapsed=$((SECONDS - started))
  if [[ $rc == 0 ]]; then
    passed=$((passed + 1))
    printf 'PASS  %-28s %4ds\n' "$name" "$elapsed"
  else
    failed=$((failed + 1))
    failures+=("$name")
    [[ $rc == 124 || $rc == 137 ]] && echo "(timed out after ${per_test_limit}s)" >>"$logs/$name.log"
    printf 'FAIL  %-28s %4ds (exit %d)\n' "$name" "$elapsed" "$rc"
    sed 's/^/    | /' "$logs/$name.log" | tail -n 30
  fi
done

if ((failed == 0)); then
  rm -rf "$logs"
else
  echo "failed: ${failures[*]} (logs in $logs)"
fi
echo "$passed passed, $failed failed"
((failed == 0))
