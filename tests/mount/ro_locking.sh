#!/usr/bin/env bash
# The image lock while mounted read-only: other readers may share the image
# (as with QEMU), writers are refused at once with a message saying the
# image is in use, and the lock is gone once the daemon has exited.
source "$(dirname "$0")/lib.sh"
init "$@"

mkdir "$T/mnt" "$T/mnt2"
qemu-img create -q -f qcow2 "$T/vm.qcow2" 64M
qemu-io -f qcow2 -c 'write -P 0xab 0 1M' "$T/vm.qcow2" >/dev/null
to_raw "$T/vm.qcow2" "$T/ref.raw"

qmount -o ro "$T/vm.qcow2" "$T/mnt"

step "a read-write mount of the same image is refused"
mount_fails "$T/vm.qcow2" "$T/mnt2"
grep -qiE "lock|in use|another process" <<<"$ERR" || fail "message does not say the image is in use: $ERR"

step "QEMU cannot open it for writing"
if qemu-io -f qcow2 -c 'read 0 512' "$T/vm.qcow2" >/dev/null 2>&1; then
  fail "qemu-io opened the image read-write while it is mounted"
fi

step "other readers may share it"
qemu-img info "$T/vm.qcow2" >/dev/null || fail "qemu-img info could not read the mounted image"
qmount -o ro "$T/vm.qcow2" "$T/mnt2"
cmp "$T/mnt2/vm.raw" "$T/ref.raw" || fail "second read-only mount reads wrong data"
cmp "$T/mnt/vm.raw" "$T/ref.raw" || fail "first read-only mount reads wrong data"
qumount "$T/mnt2"  # the first mount still holds its lock

step "after unmounting, writers get the image"
qumount "$T/mnt" "$T/vm.qcow2"
qemu-io -f qcow2 -c 'read -P 0xab 0 1M' "$T/vm.qcow2" >/dev/null ||
  fail "qemu-io could not open the image after unmount"

step "ro,lock=off takes no lock at all"
qmount -o ro,lock=off "$T/vm.qcow2" "$T/mnt"
flock -n "$T/vm.qcow2" true || fail "the image is flock()ed although lock=off"
qemu-io -f qcow2 -c 'read -P 0xab 0 1M' "$T/vm.qcow2" >/dev/null ||
  fail "qemu-io could not open the image beside a lock=off mount"
cmp "$T/mnt/vm.raw" "$T/ref.raw" || fail "lock=off mount reads wrong data"
qumount "$T/mnt" "$T/vm.qcow2"
echo "ok"
