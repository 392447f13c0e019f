#!/usr/bin/env bash
# `umount /mnt && qemu-img check vm.qcow2` works: umount(8) runs
# umount.fuse.qcow2fs, which unmounts and returns only once the daemon has
# applied the queued writes, flushed, closed the image and exited.
#  - right after heavy writes (the write-behind queue full), 5 times: the
#    check passes at once and every byte is in the image;
#  - a busy mount is refused (exit 32) and keeps working;
#  - a dead mount (daemon killed) is removed, and umount says the image was
#    not closed cleanly (exit 1);
#  - a final flush that fails (host file system full) makes umount fail.
source "$(dirname "$0")/lib.sh"
init "$@"
need dd cmp mkfs.ext4 losetup
use_umount_helper

mkdir "$T/mnt"
dd if=/dev/urandom of="$T/data" bs=1M count=48 status=none

for round in 1 2 3 4 5; do
  step "round $round: heavy writes, then umount && qemu-img check"
  rm -f "$T/vm.qcow2"
  qemu-img create -q -f qcow2 "$T/vm.qcow2" 256M
  qmount "$T/vm.qcow2" "$T/mnt"
  # Two streams of large direct writes: write-behind answers them at once
  # and queues them; nothing is fsync()ed.
  dd if="$T/data" of="$T/mnt/vm.raw" bs=1M oflag=direct conv=notrunc status=none &
  dd if="$T/data" of="$T/mnt/vm.raw" bs=1M seek=100 oflag=direct conv=notrunc status=none
  wait
  rc=0
  umount "$T/mnt" && qemu-img check "$T/vm.qcow2" >"$T/check.log" 2>&1 || rc=$?
  [[ $rc == 0 ]] || { cat "$T/check.log" >&2; fail "umount && qemu-img check exited with $rc"; }
  ! findmnt -rn --mountpoint "$T/mnt" >/dev/null || fail "still mounted"
  # The daemon is gone, not just the mount.
  [[ -z $(daemon_pid "$T/mnt") ]] || fail "the daemon still runs after umount returned"
  qemu-img convert -O raw "$T/vm.qcow2" "$T/after.raw"
  cmp -n $((48 << 20)) "$T/data" "$T/after.raw" || fail "first stream incomplete"
  cmp -i 0:$((100 << 20)) -n $((48 << 20)) "$T/data" "$T/after.raw" || fail "second stream incomplete"
done

step "a busy mount is refused and keeps working"
qmount "$T/vm.qcow2" "$T/mnt"
exec 3<"$T/mnt/vm.raw"
rc=0
umount "$T/mnt" 2>"$T/umount.err" || rc=$?
[[ $rc == 32 ]] || fail "umount of a busy mount exited with $rc: $(cat "$T/umount.err")"
echo "   refused: $(cat "$T/umount.err")"
cmp -n 4096 "$T/data" "$T/mnt/vm.raw" || fail "the mount stopped working after a refused umount"
exec 3<&-
umount "$T/mnt" || fail "umount after closing the file failed"
qemu-img check "$T/vm.qcow2" >/dev/null || fail "image not clean after umount"

step "a dead mount: umount removes it and says the image was not closed"
qmount "$T/vm.qcow2" "$T/mnt"
pid=$(daemon_pid "$T/mnt")
kill -KILL "$pid"
wait_gone "$pid"
rc=0
timeout "$TIMEOUT" umount "$T/mnt" 2>"$T/umount.err" || rc=$?
[[ $rc == 1 ]] || fail "umount of a dead mount exited with $rc: $(cat "$T/umount.err")"
grep -q "qemu-img check" "$T/umount.err" || fail "no advice: $(cat "$T/umount.err")"
! findmnt -rn --mountpoint "$T/mnt" >/dev/null || fail "the dead mount is still there"
echo "   $(cat "$T/umount.err")"

step "a failed final flush makes umount fail"
# The host file system sits on a loop device whose backing file lives on a
# tmpfs far smaller than the file system thinks it is: buffered writes
# succeed, the sync at unmount fails (EIO).
mkdir "$T/small" "$T/host"
timeout "$TIMEOUT" mount -t tmpfs -o size=8M tmpfs "$T/small"
truncate -s 64M "$T/small/host.ext4"
mkfs.ext4 -q -F -E lazy_itable_init=1,lazy_journal_init=1 "$T/small/host.ext4"
attach_loop "$T/small/host.ext4"
timeout "$TIMEOUT" mount "$LOOP" "$T/host" || fail "mounting the host file system failed"
qemu-img create -q -f qcow2 "$T/host/vm.qcow2" 256M
qmount -o host-cache=on,write-behind=0,commit=0 "$T/host/vm.qcow2" "$T/mnt"
dd if="$T/data" of="$T/mnt/vm.raw" bs=1M conv=notrunc status=none 2>/dev/null || true
rc=0
timeout "$TIMEOUT" umount "$T/mnt" 2>"$T/umount.err" || rc=$?
[[ $rc == 1 ]] || fail "umount exited with $rc although the final flush could not work: $(cat "$T/umount.err")"
! findmnt -rn --mountpoint "$T/mnt" >/dev/null || fail "still mounted"
echo "   umount exited $rc: $(cat "$T/umount.err")"
timeout "$TIMEOUT" umount "$T/host" || umount -l "$T/host"
detach_loop "$LOOP"
timeout "$TIMEOUT" umount "$T/small"
echo "ok"
