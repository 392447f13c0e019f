#!/usr/bin/env bash
# A file system on a loop device (direct I/O) on the mounted file: mkfs.ext4,
# copy a tree in, fsck.ext4 -fn finds it clean; after unmounting everything,
# qemu-img check is clean, and a new mount shows the same tree.
source "$(dirname "$0")/lib.sh"
init "$@"
need losetup mkfs.ext4 fsck.ext4 diff

mkdir -p "$T/mnt" "$T/fs" "$T/tree/a/b/c"
random_file "$T/tree/big.bin" $((24 << 20)) 1
random_file "$T/tree/a/odd.bin" 3333333 2
python3 - "$T/tree/a/b/c" <<'PY'
import os, random, sys
r = random.Random(3)
for i in range(1, 201):
    with open(os.path.join(sys.argv[1], f"small{i}"), "wb") as f:
        f.write(r.randbytes(i * 97))
PY
ln -s ../big.bin "$T/tree/a/link"

qemu-img create -q -f qcow2 -o cluster_size=64k "$T/vm.qcow2" 512M
qmount "$T/vm.qcow2" "$T/mnt"
attach_loop "$T/mnt/vm.raw" --direct-io=on
dev=$LOOP
step "mkfs.ext4 and copy on $dev"
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$dev" || fail "mkfs.ext4 failed"
timeout "$TIMEOUT" mount "$dev" "$T/fs" || fail "mounting the new ext4 failed"
cp -a "$T/tree/." "$T/fs/" || fail "copying the tree failed"
sync -f "$T/fs/big.bin"
diff -r --no-dereference "$T/tree" "$T/fs" -x lost+found || fail "the copy differs"
rm "$T/fs/a/odd.bin"
fstrim "$T/fs" 2>/dev/null || true   # discards reach the image as hole punches
cp -a "$T/tree/a/odd.bin" "$T/fs/a/"
timeout "$TIMEOUT" umount "$T/fs"
fsck.ext4 -fn "$dev" >"$T/fsck.log" 2>&1 || { cat "$T/fsck.log"; fail "fsck.ext4 found errors"; }
detach_loop "$dev"
qumount "$T/mnt" "$T/vm.qcow2"
check_image "$T/vm.qcow2"

step "remount and compare"
qmount -o ro "$T/vm.qcow2" "$T/mnt"
attach_loop "$T/mnt/vm.raw" --direct-io=on -r
dev=$LOOP
fsck.ext4 -fn "$dev" >"$T/fsck.log" 2>&1 || { cat "$T/fsck.log"; fail "fsck.ext4 after remount"; }
timeout "$TIMEOUT" mount -o ro "$dev" "$T/fs"
diff -r --no-dereference "$T/tree" "$T/fs" -x lost+found || fail "the tree differs after remount"
timeout "$TIMEOUT" umount "$T/fs"
detach_loop "$dev"
qumount "$T/mnt" "$T/vm.qcow2"
echo "ok"
