#!/usr/bin/env bash
# SIGTERM and SIGINT while the mount is busy end the daemon within seconds,
# with exit status 0 and a clean image (qemu-img check exit 0, no leaks):
#  1. two writers write small unaligned pieces to the raw file: they get an
#     error for what was not accepted and end, nothing stays mounted;
#  2. a loop device (direct I/O) on the raw file with ext4 mounted on it and
#     a writer in the ext4: the kernel holds the file open, so the mount can
#     only be detached lazily; the daemon still finishes what it accepted,
#     closes the image and exits.
# The daemon runs with -f in the background, so its exit status is seen.
source "$(dirname "$0")/lib.sh"
init "$@"
need mkfs.ext4 losetup dd

STOP_LIMIT=15   # seconds the daemon may take to exit after the signal

mkdir "$T/mnt" "$T/fs"

# start_daemon IMAGE: mounts IMAGE on $T/mnt with -f in the background;
# leaves the daemon's pid in $DAEMON.
start_daemon() {
  "$MOUNT_BIN" -f "$1" "$T/mnt" 2>"$T/daemon.log" &
  DAEMON=$!
  PIDS+=("$DAEMON")
  local i
  for i in $(seq $((TIMEOUT * 10))); do
    [[ -e $T/mnt/vm.raw ]] && return 0
    kill -0 "$DAEMON" 2>/dev/null || { cat "$T/daemon.log" >&2; fail "the daemon exited at start"; }
    sleep 0.1
  done
  fail "not mounted after ${TIMEOUT}s"
}

# stop_daemon SIGNAL: sends it, then the daemon must exit 0 in time.
stop_daemon() {
  local started=$SECONDS rc=0
  kill -"$1" "$DAEMON"
  timeout "$STOP_LIMIT" tail --pid="$DAEMON" -f /dev/null ||
    fail "the daemon still runs ${STOP_LIMIT}s after SIG$1 (deadlock)"
  wait "$DAEMON" || rc=$?
  [[ $rc == 0 ]] || { cat "$T/daemon.log" >&2; fail "the daemon exited with $rc after SIG$1"; }
  echo "   daemon exited 0, $((SECONDS - started))s after SIG$1"
}

# A writer of small unaligned pieces: 3001-byte writes from byte $1 on.
writer() {
  exec dd if=/dev/urandom of="$T/mnt/vm.raw" bs=3001 seek="$1" oflag=seek_bytes \
    conv=notrunc count=200000 status=none 2>>"$T/writers.log"
}

for round in 1 2 3; do
  for sig in TERM INT; do
    step "round $round: SIG$sig with two writers of unaligned pieces"
    rm -f "$T/vm.qcow2"
    qemu-img create -q -f qcow2 "$T/vm.qcow2" 1G
    start_daemon "$T/vm.qcow2"
    writer 12345 &
    w1=$!
    writer $(((512 << 20) + 777)) &
    w2=$!
    sleep 2
    kill -0 "$w1" 2>/dev/null && kill -0 "$w2" 2>/dev/null ||
      fail "a writer ended before the signal: $(cat "$T/writers.log")"
    stop_daemon "$sig"
    for w in "$w1" "$w2"; do
      timeout 10 tail --pid="$w" -f /dev/null || fail "writer $w still blocked in write() after the daemon exited"
      if wait "$w"; then fail "writer $w succeeded although the mount went away"; fi
    done
    ! findmnt -rn --mountpoint "$T/mnt" >/dev/null || fail "still mounted after SIG$sig"
    timeout "$TIMEOUT" flock "$T/vm.qcow2" true || fail "the image is still locked"
    check_image "$T/vm.qcow2"
  done
done
echo "   writers' errors: $(sort -u "$T/writers.log" | tr '\n' ' ')"

step "SIGTERM with ext4 mounted on a loop device on the file"
rm -f "$T/vm.qcow2"
qemu-img create -q -f qcow2 "$T/vm.qcow2" 1G
start_daemon "$T/vm.qcow2"
attach_loop "$T/mnt/vm.raw" --direct-io=on
mkfs.ext4 -q "$LOOP" || fail "mkfs.ext4 failed"
timeout "$TIMEOUT" mount "$LOOP" "$T/fs" || fail "mounting ext4 failed"
dd if=/dev/urandom of="$T/fs/file" bs=64k count=100000 oflag=direct status=none 2>/dev/null &
w=$!
sleep 2
stop_daemon TERM
# The FUSE mount is detached from the tree; the loop device and ext4 on it
# now only get errors.
! findmnt -rn --mountpoint "$T/mnt" >/dev/null || fail "$T/mnt still in the mount table"
timeout "$TIMEOUT" flock "$T/vm.qcow2" true || fail "the image is still locked"
check_image "$T/vm.qcow2"
kill "$w" 2>/dev/null || true
timeout 20 tail --pid="$w" -f /dev/null || echo "   (the ext4 writer is still stuck)"
echo "ok"
