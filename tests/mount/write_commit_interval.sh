#!/usr/bin/env bash
# commit=: writes that are never fsync()ed are committed in the background.
# With -o commit=1, data written by dd without conv=fsync or oflag=sync (large
# queued writes and small direct ones) is in the image after a few seconds:
# SIGKILL the daemon then, remove the dead mount, and qemu-img check finds no
# corruption (exit 0, or 3 for leaked clusters) and qemu-img convert reads
# back exactly what dd wrote. The negative control, -o commit=0, makes no
# promise about the unsynced data (whether it survived is only printed), but
# the image must not be corrupt either. Last, a background commit that
# fails (the host file system is full, and nobody calls fsync) is reported
# by close(2), by the next fsync(2) and by the daemon's exit status.
source "$(dirname "$0")/lib.sh"
init "$@"
need dd cmp python3 mkfs.ext4

SIZE=$((64 << 20))
mkdir "$T/mnt"
random_file "$T/big" $((6 << 20)) 31     # 1 MiB requests: write-behind
random_file "$T/small" $((64 << 10)) 32  # 4 KiB requests: applied at once

# crash_after_writes COMMIT: writes without fsync, waits 4 s, kills the
# daemon with SIGKILL and removes the dead mount. Leaves the raw contents of
# the image in $T/after.raw.
crash_after_writes() {
  local commit=$1 pid rc
  rm -f "$T/vm.qcow2"
  qemu-img create -q -f qcow2 -o cluster_size=64k "$T/vm.qcow2" $SIZE
  qmount -o "commit=$commit" "$T/vm.qcow2" "$T/mnt"
  pid=$(daemon_pid "$T/mnt")
  [[ -n $pid ]] || fail "no daemon pid for $T/mnt"
  step "commit=$commit: dd without fsync, then SIGKILL after 4 s (daemon $pid)"
  dd if="$T/big" of="$T/mnt/vm.raw" bs=1M seek=4 conv=notrunc status=none ||
    fail "writing 6 MiB failed"
  dd if="$T/small" of="$T/mnt/vm.raw" bs=4k seek=$(((20 << 20) / 4096 + 1)) conv=notrunc \
    status=none || fail "writing 64 KiB in 4 KiB pieces failed"
  sleep 4
  kill -KILL "$pid"
  wait_gone "$pid"
  if timeout "$TIMEOUT" fusermount3 -uz "$T/mnt"; then :; else
    timeout "$TIMEOUT" umount -l "$T/mnt" || fail "neither fusermount3 -uz nor umount -l removed the dead mount"
  fi
  ! findmnt -rn --mountpoint "$T/mnt" >/dev/null || fail "still mounted after removing the dead mount"
  timeout "$TIMEOUT" flock "$T/vm.qcow2" true || fail "lock not released by the killed daemon"

  rc=0
  qemu-img check "$T/vm.qcow2" >"$T/check.log" 2>&1 || rc=$?
  case $rc in
    0) echo "   qemu-img check: exit 0, clean" ;;
    3) echo "   qemu-img check: exit 3, leaked clusters only: $(grep -i leaked "$T/check.log" | head -n1)" ;;
    *) cat "$T/check.log" >&2; fail "commit=$commit: qemu-img check exited with $rc (corruption)" ;;
  esac
  to_raw "$T/vm.qcow2" "$T/after.raw"
}

# survived: whether $T/after.raw holds what dd wrote.
survived() {
  cmp -s -i $((4 << 20)):0 -n $((6 << 20)) "$T/after.raw" "$T/big" &&
    cmp -s -i $(((20 << 20) + 4096)):0 -n $((64 << 10)) "$T/after.raw" "$T/small"
}

crash_after_writes 1
survived || fail "commit=1: data written without fsync 4 s before the crash is not in the image"
# Nothing else was written: the rest reads as zeros.
cmp -s -n $((4 << 20)) "$T/after.raw" /dev/zero || fail "commit=1: bytes before the written range changed"
echo "   commit=1: all data written without fsync survived"

crash_after_writes 0
if survived; then
  echo "   commit=0: the unsynced data happened to survive (not required)"
else
  echo "   commit=0: the unsynced data was lost, as allowed without a commit"
fi

step "the image mounts and reads after the crash"
qmount -o ro "$T/vm.qcow2" "$T/mnt"
cat "$T/mnt/vm.raw" >/dev/null || fail "reading the whole disk after the crash failed"
qumount "$T/mnt" "$T/vm.qcow2"

step "a failed background commit: reported at close, fsync and exit"
mkdir "$T/host"
truncate -s 96M "$T/host.ext4"
mkfs.ext4 -q -F "$T/host.ext4" || fail "mkfs.ext4 failed"
attach_loop "$T/host.ext4"
timeout "$TIMEOUT" mount "$LOOP" "$T/host" || fail "mounting the host file system failed"
img=$T/host/vm.qcow2
qemu-img create -q -f qcow2 "$img" 512M
# In the foreground, to see the exit status.
"$MOUNT_BIN" -f -o commit=1 "$img" "$T/mnt" 2>"$T/daemon.log" &
fg_pid=$!
PIDS+=("$fg_pid")
for i in $(seq $((TIMEOUT * 10))); do
  findmnt -rn --mountpoint "$T/mnt" >/dev/null && break
  kill -0 "$fg_pid" 2>/dev/null || { cat "$T/daemon.log" >&2; fail "the foreground daemon exited"; }
  sleep 0.1
done
findmnt -rn --mountpoint "$T/mnt" >/dev/null || fail "not mounted after ${TIMEOUT}s"
# With write-behind, host space is reserved before a write is queued, so
# the full host usually fails dd's write(2) itself, and nothing fails in the
# background. Should a queued write or a commit fail in the background all
# the same, without fsync only a commit or a close can find out: then it
# must be returned by close, fsync and the exit status. (dd's own close may
# already report it.)
rc=0
dd if=/dev/urandom of="$T/mnt/vm.raw" bs=1M count=200 oflag=direct conv=notrunc status=none \
  2>"$T/dd.err" || rc=$?
echo "   dd exited with $rc: $(tr '\n' ' ' <"$T/dd.err")"
[[ $rc != 0 ]] || fail "200 MiB fit on a 96 MiB host file system"
sleep 3
background=0
grep -q "background commit failed\|queued write .* failed" "$T/daemon.log" && background=1
if [[ $background == 0 ]]; then
  grep -q "error writing.*No space left on device" "$T/dd.err" ||
    fail "nothing failed in the background, yet dd's write did not fail with ENOSPC"
  echo "   the full host failed dd's write(2); nothing failed in the background"
fi
python3 - "$T/mnt/vm.raw" "$rc" "$background" <<'PY' || fail "the failed commit was not reported"
import errno, os, sys
path, dd_failed, background = sys.argv[1], sys.argv[2] != "0", sys.argv[3] == "1"
def err_of(call):
    try:
        call()
    except OSError as e:
        return e.errno
    return 0
fd = os.open(path, os.O_WRONLY)
at_close = err_of(lambda: os.close(fd))
fd = os.open(path, os.O_WRONLY)
at_fsync = err_of(lambda: os.fsync(fd))
os.close(fd)
print(f"   close after the failure: {errno.errorcode.get(at_close, at_close)}, "
      f"fsync: {errno.errorcode.get(at_fsync, at_fsync)}")
if background:
    assert at_fsync == errno.ENOSPC, "fsync did not return ENOSPC"
    # The first close after the failure returns it: dd's, if the commit
    # failed before dd closed the file, else ours.
    assert dd_failed or at_close == errno.ENOSPC, "no close returned ENOSPC"
else:
    assert at_close == 0 and at_fsync == 0, "an error with nothing failed in the background"
PY
timeout "$TIMEOUT" umount "$T/mnt" || fail "umount failed"
rc=0
timeout "$TIMEOUT" tail --pid="$fg_pid" -f /dev/null || fail "the daemon did not exit"
wait "$fg_pid" || rc=$?
if [[ $background == 1 ]]; then
  [[ $rc != 0 ]] || { cat "$T/daemon.log" >&2; fail "the daemon exited with 0 after a failed commit"; }
else
  [[ $rc == 0 ]] || { cat "$T/daemon.log" >&2; fail "the daemon exited with $rc, yet nothing failed"; }
fi
echo "   daemon exited with $rc"
check_image "$img" leaks
timeout "$TIMEOUT" umount "$T/host"
echo "ok"
