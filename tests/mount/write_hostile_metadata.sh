#!/usr/bin/env bash
# Guest writes through the mount never land on metadata: an image whose L2
# entry points into its L1 table, or whose L2 table is counted free, gets
# EIO for the write (as QEMU does), is marked corrupt, and its tables are
# left as they were; reads of other data go on.
source "$(dirname "$0")/lib.sh"
init "$@"
need od dd cmp

be64() {  # be64 FILE OFFSET: the big-endian 64-bit value there, in decimal
  local hex
  hex=$(od -An -tx1 -v -j "$2" -N8 "$1" | tr -d ' \n')
  echo $((16#$hex))
}
put_be64() {  # put_be64 FILE OFFSET VALUE
  local hex i bytes=""
  hex=$(printf '%016x' "$3")
  for i in 0 2 4 6 8 10 12 14; do bytes+="\\x${hex:$i:2}"; done
  printf "$bytes" | dd of="$1" bs=1 seek="$2" conv=notrunc status=none
}
MASK=$((0x00fffffffffffe00))
COPIED=$((1 << 63))

make_image() {  # make_image PATH: 64 MiB, 64 KiB clusters, guest cluster 0 written
  qemu-img create -q -f qcow2 -o cluster_size=64k "$1" 64M
  qemu-io -f qcow2 -c 'write -P 0x61 0 64k' -c 'write -P 0x62 1M 64k' "$1" >/dev/null
  L1=$(be64 "$1" 40)
  L2=$(( $(be64 "$1" "$L1") & MASK ))
  RT=$(be64 "$1" 48)
  RB=$(be64 "$1" "$RT")
}

expect_refused_write() {  # expect_refused_write IMAGE GUEST_OFFSET PROTECTED_OFFSET WHAT
  local img=$1 guest=$2 protect=$3 what=$4 before after rc=0
  dd if="$img" of="$T/before.bin" bs=64k skip=$((protect / 65536)) count=1 status=none
  mkdir -p "$T/mnt"
  qmount "$img" "$T/mnt"
  head -c 4096 /dev/zero | tr '\0' 'x' >"$T/x.bin"
  dd if="$T/x.bin" of="$T/mnt/$(basename "${img%.qcow2}").raw" bs=4096 seek=$((guest / 4096)) \
    oflag=direct conv=notrunc,fsync status=none 2>"$T/dd.err" || rc=$?
  [[ $rc != 0 ]] || fail "a write onto $what succeeded"
  grep -qi "input/output error" "$T/dd.err" || fail "the write onto $what failed, but not with EIO: $(cat "$T/dd.err")"
  # Reads of other data still work.
  cmp <(dd if="$T/mnt/$(basename "${img%.qcow2}").raw" bs=64k skip=16 count=1 status=none) \
      <(head -c 65536 /dev/zero | tr '\0' 'b') || fail "reading other data after the refusal"
  qumount "$T/mnt" "$img"
  dd if="$img" of="$T/after.bin" bs=64k skip=$((protect / 65536)) count=1 status=none
  cmp "$T/before.bin" "$T/after.bin" || fail "$what was overwritten"
  qemu-img info "$img" | grep -q "corrupt: true" || fail "the image was not marked corrupt"
  echo "   refused, $what intact, image marked corrupt"
}

step "L2 entry pointing into the L1 table"
make_image "$T/into-l1.qcow2"
put_be64 "$T/into-l1.qcow2" "$L2" $(( L1 | COPIED ))
expect_refused_write "$T/into-l1.qcow2" 0 "$L1" "the L1 table"

step "L2 entry pointing into a refcount block"
make_image "$T/into-rb.qcow2"
put_be64 "$T/into-rb.qcow2" "$L2" $(( RB | COPIED ))
expect_refused_write "$T/into-rb.qcow2" 0 "$RB" "a refcount block"

step "L2 table counted free (allocation would reuse it)"
make_image "$T/free-l2.qcow2"
printf '\x00\x00' | dd of="$T/free-l2.qcow2" bs=1 seek=$(( RB + 2 * (L2 / 65536) )) conv=notrunc status=none
expect_refused_write "$T/free-l2.qcow2" $((8 << 20)) "$L2" "an L2 table"
echo "ok"
