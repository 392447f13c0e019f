#!/usr/bin/env bash
# A read-only loop device with direct I/O on the mounted file reads the
# guest disk: its bytes match qemu-img convert, and the ext4 file system in
# it mounts and holds the tree it was made from.
source "$(dirname "$0")/lib.sh"
init "$@"
need losetup mkfs.ext4 fsck.ext4 diff

step "building an ext4 image from a tree"
mkdir -p "$T/tree/sub/deeper" "$T/mnt" "$T/fs"
random_file "$T/tree/big.bin" $((7 << 20))
random_file "$T/tree/sub/odd.bin" 1234567
for i in $(seq 50); do echo "file $i" >"$T/tree/sub/deeper/f$i.txt"; done
ln -s ../big.bin "$T/tree/sub/link"
truncate -s 256M "$T/disk.raw"
mkfs.ext4 -q -F -b 4096 -d "$T/tree" "$T/disk.raw"
qemu-img convert -O qcow2 -o cluster_size=64k "$T/disk.raw" "$T/disk.qcow2"

qmount -o ro "$T/disk.qcow2" "$T/mnt"
attach_loop "$T/mnt/disk.raw" --direct-io=on -r
dev=$LOOP
step "loop device $dev"
[[ $(blockdev --getsize64 "$dev") == $((256 << 20)) ]] || fail "loop device size $(blockdev --getsize64 "$dev")"
cmp "$dev" "$T/disk.raw" || fail "$dev differs from the raw image"
fsck.ext4 -fn "$dev" >"$T/fsck.log" 2>&1 || { cat "$T/fsck.log"; fail "fsck.ext4 found errors"; }
timeout "$TIMEOUT" mount -o ro "$dev" "$T/fs" || fail "mounting the ext4 file system failed"
diff -r "$T/tree" "$T/fs" -x lost+found || fail "the file system's tree differs"
timeout "$TIMEOUT" umount "$T/fs"
detach_loop "$dev"
qumount "$T/mnt" "$T/disk.qcow2"
echo "ok"
