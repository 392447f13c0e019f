#!/usr/bin/env bash
# Ownership and access: the file's owner, group and mode mirror the image
# file's (no execute bits, no write bits when read-only), the kernel enforces
# them for other users under allow_other, and without allow_other other
# users cannot enter the mount at all.
source "$(dirname "$0")/lib.sh"
init "$@"
need runuser stat

chmod 755 "$T"  # let the unprivileged user reach the mount point
mkdir -m 755 "$T/mnt"
qemu-img create -q -f qcow2 "$T/vm.qcow2" 64M
qemu-io -f qcow2 -c 'write -P 0xab 0 1M' "$T/vm.qcow2" >/dev/null

as_nobody() { runuser -u nobody -- "$@"; }

step "owner and mode mirror the image file"
chown 4321:8765 "$T/vm.qcow2"
chmod 0751 "$T/vm.qcow2"
qmount -o ro "$T/vm.qcow2" "$T/mnt"
[[ $(stat -c '%u %g %a' "$T/mnt/vm.raw") == "4321 8765 440" ]] ||
  fail "file shows $(stat -c '%u %g %a' "$T/mnt/vm.raw"), expected 4321 8765 440"
[[ $(stat -c '%a' "$T/mnt") == 555 ]] || fail "root directory mode $(stat -c %a "$T/mnt")"
qumount "$T/mnt" "$T/vm.qcow2"
chown 0:0 "$T/vm.qcow2"

step "without allow_other, other users are kept out"
chmod 0644 "$T/vm.qcow2"
qmount -o ro "$T/vm.qcow2" "$T/mnt"
if as_nobody head -c 1 "$T/mnt/vm.raw" >/dev/null 2>&1; then
  fail "nobody could read the file without allow_other"
fi
qumount "$T/mnt" "$T/vm.qcow2"

step "with allow_other, the mode decides"
qmount -o ro,allow_other "$T/vm.qcow2" "$T/mnt"
as_nobody head -c 4096 "$T/mnt/vm.raw" >/dev/null || fail "nobody could not read a 0444 file"
if as_nobody dd if=/dev/zero of="$T/mnt/vm.raw" bs=512 count=1 conv=notrunc status=none 2>/dev/null; then
  fail "nobody wrote to a read-only mount"
fi
qumount "$T/mnt" "$T/vm.qcow2"

chmod 0600 "$T/vm.qcow2"
qmount -o ro,allow_other "$T/vm.qcow2" "$T/mnt"
[[ $(stat -c '%a' "$T/mnt/vm.raw") == 400 ]] || fail "mode $(stat -c %a "$T/mnt/vm.raw"), expected 400"
if as_nobody head -c 1 "$T/mnt/vm.raw" >/dev/null 2>&1; then
  fail "nobody read a file of mode 0400 owned by root"
fi
head -c 1 "$T/mnt/vm.raw" >/dev/null || fail "root could not read its own file"
qumount "$T/mnt" "$T/vm.qcow2"
echo "ok"
