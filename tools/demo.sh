#!/usr/bin/env bash
# The README's first command: install what is missing, build, and show the
# main job on a demo image: a qcow2 image mounted as a raw file, an ext4
# file system made and filled through a loop device on it, unmounted, and
# judged by QEMU's own tools. Needs root (mount, loop devices, /dev/fuse).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
"$ROOT/tools/install-deps.sh"
[[ -f build/meson-private/coredata.dat ]] || meson setup build -Dbuildtype=release >/dev/null
ninja -C build -j2 fuse/mount.qcow2fs tools/qcow2fs-img >/dev/null
# The programs run by the names they are installed under (README,
# "Install"), from the build tree: the demo installs nothing, so it leaves
# no stale copy in /sbin or /usr/local for mount(8) or the tests to find.
export PATH="$ROOT/build/fuse:$ROOT/build/tools:$PATH"

work=$(mktemp -d /tmp/qcow2fs-demo.XXXXXX)
loop=
cleanup() {
  [[ -n $loop ]] && { umount "$work/fs" 2>/dev/null || true; losetup -d "$loop" 2>/dev/null || true; }
  mountpoint -q "$work/mnt" && timeout 30 umount "$work/mnt"
  mountpoint -q "$work/cmnt" && timeout 30 umount "$work/cmnt"
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/mnt" "$work/fs" "$work/cmnt"
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

step "qemu-img create -f qcow2 vm.qcow2 2G"
qemu-img create -q -f qcow2 "$work/vm.qcow2" 2G
step "mount.qcow2fs vm.qcow2 mnt"
mount.qcow2fs "$work/vm.qcow2" "$work/mnt"
ls -l "$work/mnt"

step "losetup --direct-io=on, mkfs.ext4, mount, copy /usr/share/doc into it"
loop=$(losetup --find --show --direct-io=on "$work/mnt/vm.raw")
mkfs.ext4 -q "$loop"
mount "$loop" "$work/fs"
cp -a /usr/share/doc "$work/fs/"
du -sh "$work/fs/doc"
umount "$work/fs"
fsck.ext4 -fn "$loop" >/dev/null && echo "fsck.ext4: clean"
losetup -d "$loop"
loop=

step "mkdir mnt/.snapshots/filled (a snapshot, online); ls -a mnt mnt/.snapshots/filled"
mkdir "$work/mnt/.snapshots/filled"
ls -a "$work/mnt"
ls -l "$work/mnt/.snapshots/filled"

step "umount mnt; flock vm.qcow2 true (wait until the daemon has closed it); qemu-img check"
timeout 60 umount "$work/mnt"
flock "$work/vm.qcow2" true
qemu-img check "$work/vm.qcow2"
qemu-img snapshot -l "$work/vm.qcow2"
step "qcow2fs-img check vm.qcow2 (the same verdict without QEMU)"
qcow2fs-img check "$work/vm.qcow2"
step "QEMU reads the same file system back (qemu-img convert + debugfs)"
qemu-img convert -O raw "$work/vm.qcow2" "$work/vm.img"
debugfs -R "ls -l /doc" "$work/vm.img" 2>/dev/null | head -5
rm -f "$work/vm.img"

step "mount.qcow2fs -o create,size=2G,compress=zstd small.qcow2 cmnt; cp --sparse=always disk.raw"
qemu-img convert -O raw "$work/vm.qcow2" "$work/disk.raw"
mount.qcow2fs -o create,size=2G,compression_type=zstd,compress=zstd "$work/small.qcow2" "$work/cmnt"
cp --sparse=always "$work/disk.raw" "$work/cmnt/small.raw"
timeout 120 umount "$work/cmnt"
flock "$work/small.qcow2" true
qemu-img check "$work/small.qcow2" | tail -2
qemu-img compare -q -f qcow2 -F raw "$work/small.qcow2" "$work/disk.raw" && echo "qemu-img compare: identical"
ls -ls "$work/vm.qcow2" "$work/small.qcow2"
printf '\nDemo done.\n'
