#!/usr/bin/env bash
# Compressed images two ways, side by side on one disk: `qemu-img convert -c`
# (zlib and zstd, default settings and -m 2) versus `cp --sparse=always` into
# a `mount.qcow2fs -o create,compress=...` mount, timed until the image is
# closed (umount, then waiting for the daemon's lock). The disk is an ext4
# file system filled with files from /usr: typical compressible guest data.
#
#   tools/bench/compress_bench.sh [BUILD_DIR] [SIZE_MIB]
# Writes a markdown table to stdout and tools/bench/results/compress.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BUILD=${1:-$ROOT/build}
SIZE_MIB=${2:-1024}
MOUNT=$BUILD/fuse/mount.qcow2fs
[[ -x $MOUNT ]] || { echo "build first: $MOUNT is missing" >&2; exit 1; }
[[ $(id -u) == 0 ]] || { echo "needs root (loop mounts, FUSE)" >&2; exit 1; }

work=$(mktemp -d /tmp/qcow2fs-compress-bench.XXXXXX)
cleanup() {
  mountpoint -q "$work/fs" && umount "$work/fs"
  mountpoint -q "$work/mnt" && timeout 120 umount "$work/mnt"
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/fs" "$work/mnt"

echo "building a ${SIZE_MIB} MiB ext4 disk filled from /usr ..." >&2
truncate -s "${SIZE_MIB}M" "$work/disk.raw"
mkfs.ext4 -q "$work/disk.raw"
mount -o loop "$work/disk.raw" "$work/fs"
# Fill until the file system is full; tar stops with ENOSPC, which is the point.
tar -C /usr -cf - lib share bin 2>/dev/null | tar -C "$work/fs" -xf - 2>/dev/null || true
used=$(df -BM --output=used "$work/fs" | tail -1 | tr -dc 0-9)
umount "$work/fs"
echo "disk holds ${used} MiB of files" >&2

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
size_mib() { du -B1 "$1" | awk '{ printf "%.1f", $1 / 1048576 }'; }
rows=()
measure() {  # label image command...
  local label=$1 image=$2
  shift 2
  rm -f "$image"
  drop_caches
  local start end
  start=$(date +%s.%N)
  "$@"
  end=$(date +%s.%N)
  qemu-img check -q "$image" || { echo "$label: qemu-img check failed" >&2; exit 1; }
  qemu-img compare -q -f qcow2 -F raw "$image" "$work/disk.raw" ||
    { echo "$label: image differs from the disk" >&2; exit 1; }
  rows+=("| $label | $(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }') | $(size_mib "$image") | $(du -B1 "$image" | cut -f1) | $(stat -c %s "$image") |")
  rm -f "$image"
}
qcow2fs_cp() {  # type image
  "$MOUNT" -o "create,size=${SIZE_MIB}M,compress=$1,compression_type=$1" "$2" "$work/mnt"
  cp --sparse=always "$work/disk.raw" "$work/mnt/$(basename "${2%.qcow2}").raw"
  umount "$work/mnt"
  flock "$2" true  # the daemon has flushed and closed the image
}

for type in zlib zstd; do
  measure "qemu-img convert -c ($type)" "$work/q.qcow2" \
    qemu-img convert -c -O qcow2 -o compression_type=$type "$work/disk.raw" "$work/q.qcow2"
  measure "qemu-img convert -c -m 2 ($type)" "$work/q.qcow2" \
    qemu-img convert -c -m 2 -O qcow2 -o compression_type=$type "$work/disk.raw" "$work/q.qcow2"
  measure "cp into mount.qcow2fs -o compress=$type" "$work/c.qcow2" qcow2fs_cp "$type" "$work/c.qcow2"
done

mkdir -p "$ROOT/tools/bench/results"
{
  echo "## Compressed images: qemu-img convert -c vs cp into a compress mount ($(date +%F))"
  echo
  echo "$(nproc) CPUs, $(uname -r); $(qemu-img --version | head -1); disk: ${SIZE_MIB} MiB ext4 holding ${used} MiB of /usr files. Time until the image is closed, page cache dropped before each run; size is the image's allocated bytes (du), also given exactly, with the file's length (ls -l). Every image passed qemu-img check and compare."
  echo
  echo "| method | time (s) | image (MiB) | allocated (bytes) | length (bytes) |"
  echo "|---|---:|---:|---:|---:|"
  printf '%s\n' "${rows[@]}"
} | tee "$ROOT/tools/bench/results/compress.md"
