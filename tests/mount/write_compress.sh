#!/usr/bin/env bash
# -o compress=TYPE stores written clusters compressed: after writes (whole
# clusters and small unaligned ones) and unmount, qemu-img check counts
# compressed clusters and finds nothing wrong, the image is much smaller
# than the data, and qemu-img convert reads back exactly what was written.
# A compression type other than the image's is refused.
source "$(dirname "$0")/lib.sh"
init "$@"
need python3

mkdir "$T/mnt"
# Compressible but not trivial: numbered text lines.
python3 -c '
import sys
with open(sys.argv[1], "w") as f:
    for i in range(400000):
        f.write(f"line {i:08d} of the compressible test data\n")' "$T/text"
head -c $((16 << 20)) "$T/text" >"$T/data"

compressed_clusters() {
  qemu-img check --output=json "$1" 2>/dev/null |
    python3 -c 'import json, sys; print(json.load(sys.stdin).get("compressed-clusters", 0))'
}

# write_and_check IMAGE [mount options]
write_and_check() {
  local img=$1 opts=$2
  truncate -s 64M "$T/ref.raw"
  qmount -o "$opts" "$img" "$T/mnt"
  dd if="$T/data" of="$T/mnt/$(basename "${img%.qcow2}").raw" bs=1M seek=4 conv=notrunc status=none
  dd if="$T/data" of="$T/ref.raw" bs=1M seek=4 conv=notrunc status=none
  # Small unaligned writes, staged until their clusters are complete.
  for off in 100 70000 5000000 33554431; do
    dd if="$T/text" of="$T/mnt/$(basename "${img%.qcow2}").raw" bs=1 count=777 skip=$off \
       seek=$off conv=notrunc status=none
    dd if="$T/text" of="$T/ref.raw" bs=1 count=777 skip=$off seek=$off conv=notrunc status=none
  done
  cmp "$T/mnt/$(basename "${img%.qcow2}").raw" "$T/ref.raw" || fail "mount reads back other data ($opts)"
  qumount "$T/mnt" "$img"
  check_image "$img"
  local n
  n=$(compressed_clusters "$img")
  (( n > 0 )) || fail "no compressed clusters in $img ($opts)"
  (( $(stat -c %s "$img") < 8 << 20 )) || fail "$img is $(stat -c %s "$img") bytes: not compressed"
  to_raw "$img" "$T/after.raw"
  cmp "$T/after.raw" "$T/ref.raw" || fail "image contents differ ($opts)"
  echo "   $n compressed clusters, image $(stat -c %s "$img") bytes"
}

step "compress=zlib on an existing zlib image"
qemu-img create -q -f qcow2 "$T/zlib.qcow2" 64M
write_and_check "$T/zlib.qcow2" compress=zlib

step "create with compress=zstd makes a zstd image"
write_and_check "$T/zstd.qcow2" create,size=64M,compress=zstd
qemu-img info "$T/zstd.qcow2" | grep -q "compression type: zstd" || fail "created image is not zstd"

step "a compression type other than the image's is refused"
mount_fails -o compress=zstd "$T/zlib.qcow2" "$T/mnt"
echo "ok"
