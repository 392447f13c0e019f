#!/usr/bin/env bash
# An image QEMU left dirty (lazy refcounts, killed mid-write) is repaired
# when it is mounted read-write, as QEMU repairs it on open: one warning
# line says so, the mount is read-write, the data QEMU wrote is there, and
# after more writes and an unmount qemu-img check finds the image clean.
# An image marked corrupt is still mounted read-only until
# `qcow2fs-img check -r all` repairs it.
source "$(dirname "$0")/lib.sh"
init "$@"
need qemu-io cmp dd
IMG_TOOL=$(dirname "$MOUNT_BIN")/../tools/qcow2fs-img
[[ -x $IMG_TOOL ]] || fail "qcow2fs-img not found next to the daemon's build ($IMG_TOOL)"

mkdir -p "$T/mnt"
img=$T/vm.qcow2
step "a dirty image: lazy_refcounts=on, qemu-io killed after writing"
qemu-img create -q -f qcow2 -o lazy_refcounts=on "$img" 64M
# (Under its own shell, whose "Killed" note goes to /dev/null.)
bash -c 'qemu-io -f qcow2 -c "write -P 0x5a 0 4M" -c "write -P 0x5b 8M 1M" -c "sigraise 9" "$1"; true' \
  _ "$img" >/dev/null 2>&1
qemu-img info "$img" | grep -q "dirty bit" || qemu-img info --output=json "$img" | grep -q '"dirty-flag": true' ||
  fail "qemu-io did not leave the image dirty"
rc=0
qemu-img check "$img" >"$T/before.txt" 2>&1 || rc=$?
[[ $rc != 0 ]] || fail "qemu-img check finds the dirty image clean already: the test proves nothing"
echo "   qemu-img check before: exit $rc"

step "mounted read-write, repaired, with one line saying so"
qmount "$img" "$T/mnt" 2>"$T/err" || { cat "$T/err" >&2; fail "mount failed"; }
echo "   stderr: $(cat "$T/err")"
grep -q "not closed cleanly (dirty); refcounts repaired" "$T/err" || fail "no repair message: $(cat "$T/err")"
[[ $(wc -l <"$T/err") == 1 ]] || fail "expected one line, got: $(cat "$T/err")"
findmnt -rn -o OPTIONS --mountpoint "$T/mnt" | tr ',' '\n' | grep -qx rw || fail "not mounted read-write"
cmp <(dd if="$T/mnt/vm.raw" bs=1M count=4 status=none) <(head -c 4M /dev/zero | tr '\0' '\132') ||
  fail "the data QEMU wrote before the crash is not there"
head -c 2M /dev/urandom >"$T/new.bin"
dd if="$T/new.bin" of="$T/mnt/vm.raw" bs=1M seek=16 oflag=direct conv=notrunc,fsync status=none
qumount "$T/mnt" "$img"
qemu-img check "$img" >/dev/null || fail "qemu-img check after the repaired mount: $(qemu-img check "$img" 2>&1)"
to_raw "$img" "$T/all.raw"
cmp <(dd if="$T/all.raw" bs=1M skip=16 count=2 status=none) "$T/new.bin" ||
  fail "the write through the repaired mount is not in the image"
echo "   clean, data intact"

step "a corrupt image stays read-only until qcow2fs-img check -r all"
qemu-img create -q -f qcow2 "$T/c.qcow2" 64M
qemu-io -f qcow2 -c 'write -P 0x33 0 1M' "$T/c.qcow2" >/dev/null
# The corrupt bit (incompatible feature bit 1, header byte 79).
printf '\x02' | dd of="$T/c.qcow2" bs=1 seek=79 conv=notrunc status=none
qmount "$T/c.qcow2" "$T/mnt" 2>"$T/err"
findmnt -rn -o OPTIONS --mountpoint "$T/mnt" | tr ',' '\n' | grep -qx ro || fail "a corrupt image was mounted read-write"
qumount "$T/mnt" "$T/c.qcow2"
"$IMG_TOOL" check -r all "$T/c.qcow2" >"$T/repair.txt" 2>&1 ||
  fail "qcow2fs-img check -r all failed: $(cat "$T/repair.txt")"
qemu-img info "$T/c.qcow2" | grep -q "corrupt: true" && fail "the corrupt bit is still set after the repair"
qmount "$T/c.qcow2" "$T/mnt"
findmnt -rn -o OPTIONS --mountpoint "$T/mnt" | tr ',' '\n' | grep -qx rw || fail "not read-write after the repair"
qumount "$T/mnt" "$T/c.qcow2"
qemu-img check "$T/c.qcow2" >/dev/null || fail "qemu-img check after repair and mount"
echo ok
