#!/usr/bin/env bash
# Read-only mounts of images in the layouts qemu-img makes show exactly the
# bytes `qemu-img convert -O raw` produces: whole-file cmp, unaligned reads,
# reads at and past the end, name, size and mode of the file.
source "$(dirname "$0")/lib.sh"
init "$@"

# Data at aligned and unaligned places, zero clusters, compressed clusters,
# and a partly overwritten compressed cluster.
fill() {
  qemu-io -f qcow2 \
    -c 'write -P 0xab 0 1M' \
    -c 'write -P 0x11 1536k 100k' \
    -c 'write -P 0x22 3000000 77777' \
    -c 'write -z 8M 2M' \
    -c 'write -c -P 0x33 12M 2M' \
    -c 'write -P 0x44 12300k 5k' \
    -c 'write -P 0x55 63M 1M' \
    "$1" >/dev/null || fail "qemu-io on $1 failed"
}

# image name : qemu-img create options
declare -A layouts=(
  [v3.qcow2]="-o cluster_size=64k"
  [small_clusters.qcow2]="-o cluster_size=4k"
  [big_clusters.qcow2]="-o cluster_size=2M"
  [v2.qcow2]="-o compat=0.10"
  [zstd.qcow2]="-o compression_type=zstd"
  [extended_l2.qcow2]="-o extended_l2=on,cluster_size=128k"
)

mkdir "$T/mnt"
for name in "${!layouts[@]}"; do
  step "$name (${layouts[$name]})"
  img=$T/$name
  # shellcheck disable=SC2086  # the options are words
  qemu-img create -q -f qcow2 ${layouts[$name]} "$img" 64M
  fill "$img"
  to_raw "$img" "$T/ref.raw"
  qmount -o ro "$img" "$T/mnt"

  file=$T/mnt/${name%.qcow2}.raw
  [[ $(ls "$T/mnt") == "${name%.qcow2}.raw" ]] || fail "directory holds: $(ls -a "$T/mnt")"
  [[ $(stat -c %s "$file") == 67108864 ]] || fail "size is $(stat -c %s "$file")"
  [[ $(stat -c %A "$file") == -r--r--r-- ]] || fail "mode is $(stat -c %A "$file")"
  cmp "$file" "$T/ref.raw" || fail "$name differs from qemu-img convert"

  # Unaligned reads of odd sizes, through small and large buffers.
  for range in 0:1 511:2 4095:4097 1048575:3 2999999:80000 12582911:1048578 \
               67108863:1 67100000:8864; do
    off=${range%:*} len=${range#*:}
    cmp <(dd if="$file" bs=64k iflag=skip_bytes,count_bytes skip="$off" count="$len" status=none) \
        <(dd if="$T/ref.raw" bs=64k iflag=skip_bytes,count_bytes skip="$off" count="$len" status=none) ||
      fail "$name: $len bytes at $off differ"
  done
  # Reads at and past the end return nothing.
  got=$(python3 -c '
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
print(len(os.pread(fd, 4096, 64 << 20)), len(os.pread(fd, 4096, (64 << 20) + 12345)),
      len(os.pread(fd, 4096, (64 << 20) - 100)))' "$file")
  [[ $got == "0 0 100" ]] || fail "reads at/after EOF returned $got bytes"

  qumount "$T/mnt" "$img"
done

step "backing chain: overlay over a base, both qcow2"
qemu-img create -q -f qcow2 "$T/base.qcow2" 64M
fill "$T/base.qcow2"
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$T/overlay.qcow2"
qemu-io -f qcow2 -c 'write -P 0x99 512k 1M' -c 'write -z 12M 64k' "$T/overlay.qcow2" >/dev/null
to_raw "$T/overlay.qcow2" "$T/ref.raw"
qmount -o ro "$T/overlay.qcow2" "$T/mnt"
cmp "$T/mnt/overlay.raw" "$T/ref.raw" || fail "overlay differs from qemu-img convert"
qumount "$T/mnt" "$T/overlay.qcow2"

step "filename= and names without an extension"
cp "$T/base.qcow2" "$T/disk"
qmount -o ro "$T/disk" "$T/mnt"
[[ -f $T/mnt/disk.raw ]] || fail "expected disk.raw, got: $(ls "$T/mnt")"
qumount "$T/mnt" "$T/disk"
qmount -o ro,filename=guest.img "$T/disk" "$T/mnt"
[[ $(ls "$T/mnt") == guest.img ]] || fail "expected guest.img, got: $(ls "$T/mnt")"
to_raw "$T/disk" "$T/ref.raw"
cmp "$T/mnt/guest.img" "$T/ref.raw" || fail "content under filename= differs"
qumount "$T/mnt" "$T/disk"
echo "ok"
