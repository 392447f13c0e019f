#!/usr/bin/env bash
# truncate(1) on the mounted file resizes the disk: growing works and the
# new space reads as zeros and is writable; shrinking works when nothing is
# allocated past the new end and is refused otherwise; qemu-img sees the
# new size.
source "$(dirname "$0")/lib.sh"
init "$@"
need truncate stat

M=$((1 << 20))
mkdir "$T/mnt"
qemu-img create -q -f qcow2 "$T/vm.qcow2" 64M
qemu-io -f qcow2 -c 'write -P 0xab 0 1M' -c 'write -P 0xcd 60M 1M' "$T/vm.qcow2" >/dev/null
to_raw "$T/vm.qcow2" "$T/ref.raw"

qmount "$T/vm.qcow2" "$T/mnt"
f=$T/mnt/vm.raw
step "grow to 200M"
truncate -s 200M "$f" || fail "growing failed"
[[ $(stat -c %s "$f") == $((200 * M)) ]] || fail "size after growing: $(stat -c %s "$f")"
truncate -s 200M "$T/ref.raw"
cmp "$f" "$T/ref.raw" || fail "contents after growing"
dd if=/dev/urandom of="$T/chunk" bs=1M count=2 status=none
dd if="$T/chunk" of="$f" bs=1M seek=150 conv=notrunc status=none || fail "writing the new space"
dd if="$T/chunk" of="$T/ref.raw" bs=1M seek=150 conv=notrunc status=none

step "shrinking over allocated data is refused"
if truncate -s 100M "$f" 2>/dev/null; then fail "shrank over allocated data"; fi
[[ $(stat -c %s "$f") == $((200 * M)) ]] || fail "a refused shrink changed the size"

step "shrinking an unallocated tail works"
truncate -s 160M "$f" || fail "shrinking the unallocated tail failed"
[[ $(stat -c %s "$f") == $((160 * M)) ]] || fail "size after shrinking: $(stat -c %s "$f")"
truncate -s 160M "$T/ref.raw"
cmp "$f" "$T/ref.raw" || fail "contents after shrinking"
qumount "$T/mnt" "$T/vm.qcow2"

check_image "$T/vm.qcow2"
[[ $(qemu-img info --output=json "$T/vm.qcow2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])') == $((160 * M)) ]] ||
  fail "qemu-img sees another size"
to_raw "$T/vm.qcow2" "$T/after.raw"
cmp "$T/after.raw" "$T/ref.raw" || fail "image after unmount"
echo "ok"
