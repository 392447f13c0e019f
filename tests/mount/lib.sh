# Helpers shared by the mount tests; sourced, never run on its own.
#
# A test starts with
#     source "$(dirname "$0")/lib.sh"
#     init "$@"
# where $1 is the mount.qcow2fs binary or a build directory. init creates $T,
# a scratch directory, and an EXIT trap that, however the test ends, unmounts
# everything mounted under $T (file systems on loop devices first), detaches
# the test's loop devices, stops the daemons it started and removes $T.
#
# A test passes by exiting 0 and fails by exiting non-zero, through fail()
# or `set -e`. Nothing is skipped: a missing tool or privilege is a failure.
# Every mount and unmount runs under `timeout`, so nothing can hang.

set -Eeuo pipefail
# A command failing under set -e names itself instead of ending the test
# silently.
trap 'echo "FAIL: line $LINENO: \"$BASH_COMMAND\" exited with $?" >&2' ERR

TIMEOUT=${QCOW2FS_TEST_TIMEOUT:-30}   # seconds for one mount or unmount
LOOPS=()                              # loop devices this test attached
PIDS=()                               # daemons this test started
UMOUNT_HELPER=/sbin/umount.fuse.qcow2fs   # where umount(8) looks for it
HELPER_INSTALLED=false                # this test put it there

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

step() { echo "-- $*"; }

need() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || fail "required tool '$tool' is not installed"
  done
}

init() {
  local arg=${1:-${QCOW2FS_MOUNT:-}}
  [[ -n $arg ]] || fail "usage: $0 MOUNT_QCOW2FS_BINARY|BUILD_DIR"
  [[ -d $arg ]] && arg=$arg/fuse/mount.qcow2fs
  [[ -x $arg ]] || fail "$arg is not an executable"
  MOUNT_BIN=$(realpath "$arg")
  [[ $(id -u) == 0 ]] || fail "the mount tests need root"
  [[ -c /dev/fuse ]] || fail "/dev/fuse is missing"
  need qemu-img qemu-io timeout flock findmnt fusermount3 cmp
  T=$(mktemp -d /tmp/qcow2fs-mount-test.XXXXXX)
  trap cleanup EXIT
  trap 'exit 130' INT TERM  # exits through the EXIT trap
}

# Mount points under $T, deepest first.
mounts_under_t() {
  findmnt -rn -o TARGET | awk -v t="$T/" 'index($0, t) == 1' | sort -r
}

cleanup() {
  local rc=$? m l p i
  set +e
  trap - EXIT ERR
  [[ -n ${T:-} && -d $T ]] || exit "$rc"
  # File systems on loop devices sit on top of the FUSE file: they go first.
  for m in $(mounts_under_t); do
    [[ $(findmnt -rn -o FSTYPE --mountpoint "$m") == fuse.* ]] && continue
    timeout 10 umount "$m" || umount -l "$m"
  done
  # Loop devices: those we attached, and any other on a file under $T.
  for l in "${LOOPS[@]}" $(losetup -l -n -O NAME,BACK-FILE |
                           awk -v t="$T/" 'index($2, t) == 1 { print $1 }'); do
    losetup -d "$l" 2>/dev/null
  done
  for m in $(mounts_under_t); do
    timeout 10 umount "$m" 2>/dev/null || timeout 10 fusermount3 -uz "$m" ||
      umount -l "$m"
  done
  for p in "${PIDS[@]}"; do
    kill -0 "$p" 2>/dev/null || continue
    kill -TERM "$p" 2>/dev/null
    for i in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null
  done
  if $HELPER_INSTALLED; then rm -f "$UMOUNT_HELPER"; fi
  if [[ -n $(mounts_under_t) ]]; then
    echo "cleanup: still mounted under $T, not removing it:" >&2
    mounts_under_t >&2
    exit 1
  fi
  rm -rf "$T"
  exit "$rc"
}

# The pid of the daemon serving mount point $1 ("" if none): a process whose
# command line names qcow2fs and ends with (or has) the argument $1. Scans
# /proc, so that no procps (pgrep, ps) is needed.
daemon_pid() {
  local dir args cmdline
  for dir in /proc/[0-9]*; do
    # The arguments are NUL-separated; mapfile (a builtin: no fork per
    # process) splits them. Processes may vanish meanwhile.
    mapfile -d '' args 2>/dev/null <"$dir/cmdline" || continue
    cmdline=" ${args[*]-} "
    if [[ $cmdline == *qcow2fs*" $1 "* ]]; then
      echo "${dir#/proc/}"
      return 0
    fi
  done
  return 0
}

# qmount [ARGS...] IMAGE MOUNTDIR: mounts through mount.qcow2fs, failing the
# test if that fails, and remembers the daemon for cleanup.
qmount() {
  local mnt=${*: -1} pid
  timeout "$TIMEOUT" "$MOUNT_BIN" "$@" || fail "mount.qcow2fs $* exited with $?"
  findmnt -rn --mountpoint "$mnt" >/dev/null || fail "$mnt is not mounted after mount.qcow2fs returned 0"
  pid=$(daemon_pid "$mnt")
  [[ -n $pid ]] || fail "no daemon found for $mnt"
  PIDS+=("$pid")
}

# mount_fails [ARGS...] IMAGE MOUNTDIR: the mount must fail, quickly, with a
# one-line message, and leave nothing mounted. The message is left in $ERR.
mount_fails() {
  local mnt=${*: -1} rc=0 started=$SECONDS
  ERR=$(timeout "$TIMEOUT" "$MOUNT_BIN" "$@" 2>&1 >/dev/null) || rc=$?
  [[ $rc != 0 ]] || fail "mount.qcow2fs $* succeeded but should have failed"
  [[ $rc != 124 ]] || fail "mount.qcow2fs $* hung (killed after ${TIMEOUT}s)"
  (( SECONDS - started < 10 )) || fail "mount.qcow2fs $* took $((SECONDS - started))s to fail"
  [[ -n $ERR ]] || fail "mount.qcow2fs $* failed without a message"
  [[ $(printf '%s\n' "$ERR" | wc -l) == 1 ]] || fail "mount.qcow2fs $* printed more than one line: $ERR"
  if [[ -d $mnt ]] && findmnt -rn --mountpoint "$mnt" >/dev/null; then
    fail "$mnt is mounted although mount.qcow2fs $* failed"
  fi
  echo "   refused ($rc): $ERR"
}

# Waits until process $1 has exited.
wait_gone() {
  local i
  for i in $(seq $((TIMEOUT * 10))); do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 0.1
  done
  fail "process $1 still running after ${TIMEOUT}s"
}

# qumount MOUNTDIR [IMAGE]: unmounts, then waits until the daemon has exited
# and, given IMAGE, until nothing holds the image's lock any more.
qumount() {
  local pid
  pid=$(daemon_pid "$1")
  timeout "$TIMEOUT" umount "$1" || fail "umount $1 failed"
  [[ -z $pid ]] || wait_gone "$pid"
  if [[ -n ${2:-} ]]; then
    timeout "$TIMEOUT" flock "$2" true || fail "$2 still locked ${TIMEOUT}s after umount"
  fi
}

# use_umount_helper: makes umount(8) run umount.fuse.qcow2fs (which waits
# for the daemon to close the image) for fuse.qcow2fs mounts. umount looks
# for it only in /sbin: unless one is installed there already, the build's
# copy (next to MOUNT_BIN) is put there for the length of the test.
use_umount_helper() {
  local built
  built=$(dirname "$MOUNT_BIN")/umount.fuse.qcow2fs
  if [[ -e $UMOUNT_HELPER ]]; then
    if [[ -x $built ]] && ! cmp -s "$built" "$UMOUNT_HELPER"; then
      echo "   note: testing the installed $UMOUNT_HELPER, not $built"
    fi
    return 0
  fi
  [[ -x $built ]] || fail "$built is missing (ninja fuse/umount.fuse.qcow2fs)"
  install -m 0755 "$built" "$UMOUNT_HELPER.$$" && mv "$UMOUNT_HELPER.$$" "$UMOUNT_HELPER" ||
    fail "cannot install $UMOUNT_HELPER"
  HELPER_INSTALLED=true
}

# attach_loop FILE [losetup options]: attaches a loop device, remembered for
# cleanup, and leaves its name in $LOOP. (Not meant for $(...): the device
# would be remembered in a subshell only.)
attach_loop() {
  local file=$1
  shift
  LOOP=$(timeout "$TIMEOUT" losetup -f --show "$@" "$file") || fail "losetup $* $file failed"
  LOOPS+=("$LOOP")
}

# detach_loop DEVICE
detach_loop() {
  losetup -d "$1" || fail "losetup -d $1 failed"
  local kept=() l
  for l in "${LOOPS[@]}"; do [[ $l == "$1" ]] || kept+=("$l"); done
  LOOPS=("${kept[@]}")
}

# The raw contents of an image as QEMU sees them.
to_raw() {
  qemu-img convert -O raw "$1" "$2" || fail "qemu-img convert $1 failed"
}

# qemu-img check must find no corruption (leaks allowed only with $2=leaks).
check_image() {
  local rc=0
  qemu-img check "$1" >"$T/check.log" 2>&1 || rc=$?
  if [[ $rc == 0 ]] || [[ $rc == 3 && ${2:-} == leaks ]]; then return 0; fi
  cat "$T/check.log" >&2
  fail "qemu-img check $1 exited with $rc"
}

# random_file FILE BYTES [SEED]: incompressible data from a fixed seed, so
# failures reproduce.
random_file() {
  python3 - "$1" "$2" "${3:-1}" <<'PY'
import random, sys
path, left, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r = random.Random(seed)
with open(path, "wb") as f:
    while left > 0:
        n = min(left, 1 << 20)
        f.write(r.randbytes(n))
        left -= n
PY
}

# seek_extents FILE: "start end" lines, the data extents of FILE as
# SEEK_DATA/SEEK_HOLE report them.
seek_extents() {
  python3 - "$1" <<'PY'
import errno, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
pos = 0
while pos < size:
    try:
        start = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError as e:
        assert e.errno == errno.ENXIO, e
        break
    end = os.lseek(fd, start, os.SEEK_HOLE)
    print(start, end)
    pos = end
PY
}

# map_extents IMAGE: "start end" lines, the data extents of IMAGE's guest
# disk as `qemu-img map` reports them (through its backing chain), merged.
map_extents() {
  qemu-img map --output=json "$1" | python3 -c '
import json, sys
extents = []
for e in json.load(sys.stdin):
    if not e["data"]:
        continue
    if extents and extents[-1][1] == e["start"]:
        extents[-1][1] += e["length"]
    else:
        extents.append([e["start"], e["start"] + e["length"]])
for s, e in extents:
    print(s, e)'
}
