#!/usr/bin/env bash
# The compressed-write promise as a user types it:
#   mount.qcow2fs -o create,size=...,compress=zstd small.qcow2 /mnt
#   cp --sparse=always disk.raw /mnt/small.raw && umount /mnt
# gives an image that qemu-img check finds clean, holds compressed
# clusters, equals disk.raw, and is no bigger than qemu-img convert -c
# makes it. Also plain cp (open with O_TRUNC) into an uncompressed mount.
source "$(dirname "$0")/lib.sh"
init "$@"
need python3
need mkfs.ext4

mkdir "$T/mnt" "$T/fs"
# A 256 MiB ext4 image holding real files: typical compressible disk data.
truncate -s 256M "$T/disk.raw"
mkfs.ext4 -q -d /usr/share/doc "$T/disk.raw" 2>/dev/null ||
  { mkfs.ext4 -q "$T/disk.raw" && fail "mkfs.ext4 -d unavailable"; }

for type in zstd zlib; do
  step "cp --sparse=always into -o create,compress=$type"
  img="$T/small-$type.qcow2"
  qmount -o "create,size=256M,compress=$type" "$img" "$T/mnt"
  cp --sparse=always "$T/disk.raw" "$T/mnt/small-$type.raw" || fail "cp failed"
  qumount "$T/mnt" "$img"
  check_image "$img"
  qemu-img compare -q -f qcow2 -F raw "$img" "$T/disk.raw" || fail "$img differs from disk.raw"
  n=$(qemu-img check --output=json "$img" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("compressed-clusters", 0))')
  (( n > 0 )) || fail "no compressed clusters in $img"
  qemu-img convert -c -O qcow2 -o "compression_type=$type" "$T/disk.raw" "$T/ref-$type.qcow2"
  # Allocated bytes (du) and apparent size (ls -l): neither above QEMU's.
  ours=$(du -B1 "$img" | cut -f1)
  theirs=$(du -B1 "$T/ref-$type.qcow2" | cut -f1)
  ours_len=$(stat -c %s "$img")
  theirs_len=$(stat -c %s "$T/ref-$type.qcow2")
  echo "   qcow2fs $ours bytes ($ours_len apparent), qemu-img convert -c $theirs ($theirs_len), $n compressed clusters"
  (( ours <= theirs )) || fail "compressed image takes $ours bytes, more than qemu-img's $theirs"
  (( ours_len <= theirs_len )) ||
    fail "compressed image is $ours_len bytes long, longer than qemu-img's $theirs_len"
done

step "plain cp (O_TRUNC) into an uncompressed mount fills the disk"
qemu-img create -q -f qcow2 "$T/plain.qcow2" 256M
qmount "$T/plain.qcow2" "$T/mnt"
cp "$T/disk.raw" "$T/mnt/plain.raw" || fail "cp into the mount failed"
[[ $(stat -c %s "$T/mnt/plain.raw") == $((256 << 20)) ]] || fail "the disk changed size"
qumount "$T/mnt" "$T/plain.qcow2"
check_image "$T/plain.qcow2"
qemu-img compare -q -f qcow2 -F raw "$T/plain.qcow2" "$T/disk.raw" || fail "plain copy differs"
echo "ok"
