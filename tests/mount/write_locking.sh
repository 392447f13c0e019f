#!/usr/bin/env bash
# A read-write mount has the image to itself: a second mount, read-only or
# read-write, and QEMU, even for reading, are refused at once with a message
# saying the image is in use; after unmounting, the image is free.
source "$(dirname "$0")/lib.sh"
init "$@"

mkdir "$T/mnt" "$T/mnt2"
qemu-img create -q -f qcow2 "$T/vm.qcow2" 64M
qmount "$T/vm.qcow2" "$T/mnt"

step "second mounts are refused"
for options in rw ro; do
  mount_fails -o $options "$T/vm.qcow2" "$T/mnt2"
  grep -qiE "lock|in use|another process" <<<"$ERR" || fail "message does not say the image is in use: $ERR"
done
step "QEMU is refused"
if qemu-img info "$T/vm.qcow2" >/dev/null 2>&1; then fail "qemu-img info opened an image mounted read-write"; fi
if qemu-io -r -f qcow2 -c 'read 0 512' "$T/vm.qcow2" >/dev/null 2>&1; then
  fail "qemu-io -r opened an image mounted read-write"
fi
flock -n "$T/vm.qcow2" true && fail "the image is not flock()ed"

step "free after unmount"
qumount "$T/mnt" "$T/vm.qcow2"
qemu-img info "$T/vm.qcow2" >/dev/null || fail "qemu-img info after unmount"
qmount -o ro "$T/vm.qcow2" "$T/mnt2"
qumount "$T/mnt2" "$T/vm.qcow2"
echo "ok"
