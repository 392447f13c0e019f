#!/usr/bin/env bash
# fallocate(2) through the mount: punched holes and zeroed ranges read as
# zeros (aligned or not, with discard on or off), the rest stays intact,
# punched whole clusters become holes for SEEK_HOLE and give space back,
# and plain fallocate past the end grows the disk.
source "$(dirname "$0")/lib.sh"
init "$@"
need fallocate python3 stat

C=$((64 << 10))
SIZE=$((32 << 20))
mkdir "$T/mnt"

# zero_ref OFFSET LENGTH: zeros into the reference.
zero_ref() {
  dd if=/dev/zero of="$T/ref.raw" bs=64k iflag=count_bytes oflag=seek_bytes \
     seek="$1" count="$2" conv=notrunc status=none
}

for discard in on off; do
  step "discard=$discard"
  rm -f "$T/vm.qcow2"
  qemu-img create -q -f qcow2 -o cluster_size=64k "$T/vm.qcow2" $SIZE
  qemu-io -f qcow2 -c "write -P 0xab 0 $SIZE" "$T/vm.qcow2" >/dev/null
  to_raw "$T/vm.qcow2" "$T/ref.raw"
  qmount -o discard=$discard "$T/vm.qcow2" "$T/mnt"
  f=$T/mnt/vm.raw
  blocks_before=$(stat -c %b "$f")

  fallocate -p -o $((4 * C)) -l $((16 * C)) "$f" || fail "punching whole clusters"
  zero_ref $((4 * C)) $((16 * C))
  fallocate -p -o $((100 * C + 1000)) -l $((3 * C)) "$f" || fail "punching an unaligned range"
  zero_ref $((100 * C + 1000)) $((3 * C))
  fallocate -p -o 12345 -l 100 "$f" || fail "punching inside one cluster"
  zero_ref 12345 100
  fallocate -z -o $((200 * C + 7)) -l $((5 * C)) "$f" || fail "zeroing a range"
  zero_ref $((200 * C + 7)) $((5 * C))
  fallocate -p -o $((SIZE - C)) -l $((4 * C)) "$f" || fail "punching across the end"
  zero_ref $((SIZE - C)) $C
  [[ $(stat -c %s "$f") == "$SIZE" ]] || fail "punching changed the size"
  cmp "$f" "$T/ref.raw" || fail "contents after punching/zeroing (discard=$discard)"

  python3 - "$f" $((4 * C)) $((20 * C)) <<'PY' || fail "SEEK_HOLE does not see the punched clusters"
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
start, end = int(sys.argv[2]), int(sys.argv[3])
assert os.lseek(fd, 0, os.SEEK_HOLE) == start, os.lseek(fd, 0, os.SEEK_HOLE)
assert os.lseek(fd, start, os.SEEK_DATA) == end, os.lseek(fd, start, os.SEEK_DATA)
PY
  if [[ $discard == on ]]; then
    python3 -c 'import os,sys; fd=os.open(sys.argv[1],os.O_RDWR); os.fsync(fd)' "$f"
    blocks_after=$(stat -c %b "$f")
    (( blocks_after < blocks_before )) ||
      fail "discard=on: image did not shrink on the host ($blocks_before -> $blocks_after blocks)"
  fi

  step "plain fallocate: inside is a no-op, past the end grows the disk"
  fallocate -o 0 -l $C "$f" || fail "plain fallocate inside the disk"
  fallocate -n -o $((SIZE - C)) -l $((4 * C)) "$f" || fail "fallocate --keep-size across the end"
  [[ $(stat -c %s "$f") == "$SIZE" ]] || fail "--keep-size changed the size"
  fallocate -o $((SIZE - C)) -l $((4 * C)) "$f" || fail "fallocate past the end"
  [[ $(stat -c %s "$f") == $((SIZE + 3 * C)) ]] || fail "size after growing fallocate: $(stat -c %s "$f")"
  truncate -s $((SIZE + 3 * C)) "$T/ref.raw"
  cmp "$f" "$T/ref.raw" || fail "contents after growing"

  qumount "$T/mnt" "$T/vm.qcow2"
  check_image "$T/vm.qcow2"
  to_raw "$T/vm.qcow2" "$T/after.raw"
  cmp "$T/after.raw" "$T/ref.raw" || fail "image after unmount (discard=$discard)"
done
echo "ok"
