#!/usr/bin/env bash
# How long taking and dropping a snapshot stops the live disk, on a fully
# allocated image (every guest cluster mapped: preallocation=metadata, so
# the metadata is that of a full disk without writing its data).
#   tools/bench/snapshot_bench.sh BUILD_DIR [SIZE]     (root; SIZE default 64G)
# Through a mount: a reader thread (dd, 4 KiB O_DIRECT reads in a loop)
# and a writer (the same, writes) run while `mkdir .snapshots/sN` and
# `rmdir .snapshots/sN` are timed; each loop logs its longest request, so
# the figure shows how long guest I/O waited for the metadata step. Then
# the same with qemu-img snapshot -c/-d on the unmounted image, for scale.
set -euo pipefail
BUILD=$(cd "$1" && pwd)
SIZE=${2:-64G}
MOUNT="$BUILD/fuse/mount.qcow2fs"
W=$(mktemp -d /var/tmp/snap-bench.XXXXXX)
cleanup() {
  [[ -n ${loops:-} ]] && kill $loops 2>/dev/null || true
  mountpoint -q "$W/mnt" && umount "$W/mnt"
  rm -rf "$W"
}
trap cleanup EXIT
mkdir "$W/mnt"
qemu-img create -q -f qcow2 -o preallocation=metadata "$W/vm.qcow2" "$SIZE"
echo "image: $SIZE, 64 KiB clusters, every cluster allocated (preallocation=metadata)"

now() { date +%s%N; }
ms() { echo $(( ($2 - $1) / 1000000 )); }

# One request at a time, forever; prints the longest one seen (ms) when
# stopped by SIGTERM.
io_loop() {  # io_loop read|write FILE
  local worst=0 t0 t1 d
  trap 'echo "$worst" >"$W/worst.$1"; exit 0' TERM
  while :; do
    t0=$(now)
    if [[ $1 == read ]]; then
      dd if="$2" of=/dev/null bs=4k count=1 skip=$((RANDOM * 37)) iflag=direct status=none
    else
      dd if=/dev/zero of="$2" bs=4k count=1 seek=$((RANDOM * 37 + 1)) oflag=direct conv=notrunc status=none
    fi
    t1=$(now)
    d=$(ms "$t0" "$t1")
    (( d > worst )) && worst=$d
  done
}

"$MOUNT" "$W/vm.qcow2" "$W/mnt"
io_loop read "$W/mnt/vm.raw" & loops=$!
io_loop write "$W/mnt/vm.raw" & loops="$loops $!"
sleep 2
for i in 1 2 3; do
  t0=$(now); mkdir "$W/mnt/.snapshots/s$i"; t1=$(now)
  echo "mount: mkdir .snapshots/s$i   $(ms "$t0" "$t1") ms"
done
for i in 1 2 3; do
  t0=$(now); rmdir "$W/mnt/.snapshots/s$i"; t1=$(now)
  echo "mount: rmdir .snapshots/s$i   $(ms "$t0" "$t1") ms"
done
sleep 1
kill -TERM $loops
wait $loops 2>/dev/null || true
loops=
echo "mount: longest 4 KiB O_DIRECT read meanwhile:  $(cat "$W/worst.read") ms"
echo "mount: longest 4 KiB O_DIRECT write meanwhile: $(cat "$W/worst.write") ms"
umount "$W/mnt"
flock "$W/vm.qcow2" true  # the daemon has closed the image
qemu-img check -q "$W/vm.qcow2" && echo "qemu-img check: clean"

for i in 1 2; do
  t0=$(now); qemu-img snapshot -c "q$i" "$W/vm.qcow2"; t1=$(now)
  echo "qemu-img snapshot -c q$i      $(ms "$t0" "$t1") ms (whole process)"
done
for i in 1 2; do
  t0=$(now); qemu-img snapshot -d "q$i" "$W/vm.qcow2"; t1=$(now)
  echo "qemu-img snapshot -d q$i      $(ms "$t0" "$t1") ms (whole process)"
done
