#!/usr/bin/env bash
# Writes through the mount land where they should: dd at aligned, unaligned
# and cluster-crossing offsets, buffered and O_DIRECT, are mirrored into a
# reference raw file; the mount, the image after unmount (qemu-img convert)
# and a second mount all match it, and qemu-img check finds nothing wrong.
# Writes stop at the end of the disk like on a block device.
source "$(dirname "$0")/lib.sh"
init "$@"
need python3

SIZE=$((64 << 20))
mkdir "$T/mnt"
qemu-img create -q -f qcow2 -o cluster_size=64k "$T/vm.qcow2" $SIZE
qemu-io -f qcow2 -c 'write -P 0x5a 0 2M' -c 'write -c -P 0x6b 8M 1M' "$T/vm.qcow2" >/dev/null
to_raw "$T/vm.qcow2" "$T/ref.raw"
random_file "$T/data" $((6 << 20)) 7

qmount "$T/vm.qcow2" "$T/mnt"
f=$T/mnt/vm.raw
# put OFFSET LENGTH [dd flags]: the same bytes into the mount and the reference.
put() {
  local off=$1 len=$2 flags=${3:-}
  dd if="$T/data" of="$f" bs=1M iflag=count_bytes,skip_bytes oflag=seek_bytes${flags:+,$flags} \
     skip=$((off % 4096)) seek="$off" count="$len" conv=notrunc status=none ||
    fail "writing $len bytes at $off ($flags) failed"
  dd if="$T/data" of="$T/ref.raw" bs=1M iflag=count_bytes,skip_bytes oflag=seek_bytes \
     skip=$((off % 4096)) seek="$off" count="$len" conv=notrunc status=none
}
step "buffered writes"
put 0 4096
put 1 1
put 12345 77777
put $(((64 << 10) - 100)) 200                      # crosses a cluster boundary
put $(((8 << 20) + 4096)) 8192                    # into a compressed cluster
put $((3 << 20)) $((5 << 20))                    # many clusters, large requests
put $((SIZE - 1000)) 1000                        # up to the very end
step "O_DIRECT writes"
put $((20 << 20)) $((1 << 20)) direct
put $(((30 << 20) + 4096)) $((3 << 20)) direct
put $((40 << 20)) 4096 direct,dsync
cmp "$f" "$T/ref.raw" || fail "the mount does not read back what was written"

step "writes stop at the end of the disk"
python3 - "$f" <<'PY' || fail "writes at the end of the disk"
import errno, os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
size = os.fstat(fd).st_size
assert os.pwrite(fd, b"z" * 8192, size - 4096) == 4096, "write across the end not cut short"
try:
    os.pwrite(fd, b"z", size)
except OSError as e:
    assert e.errno == errno.ENOSPC, e
else:
    raise AssertionError("write past the end succeeded")
assert os.fstat(fd).st_size == size, "a write changed the size"
PY
printf 'z%.0s' $(seq 4096) | dd of="$T/ref.raw" bs=4096 seek=$((SIZE / 4096 - 1)) conv=notrunc status=none
cmp "$f" "$T/ref.raw" || fail "data after the end-of-disk writes"

step "fsync, unmount, compare the image"
python3 -c 'import os, sys; fd = os.open(sys.argv[1], os.O_RDWR); os.fsync(fd); os.fdatasync(fd)' "$f" ||
  fail "fsync failed"
qumount "$T/mnt" "$T/vm.qcow2"
check_image "$T/vm.qcow2"
to_raw "$T/vm.qcow2" "$T/after.raw"
cmp "$T/after.raw" "$T/ref.raw" || fail "qemu-img convert after unmount differs"

step "remount reads the same"
qmount -o ro "$T/vm.qcow2" "$T/mnt"
cmp "$f" "$T/ref.raw" || fail "second mount differs"
qumount "$T/mnt" "$T/vm.qcow2"
echo "ok"
